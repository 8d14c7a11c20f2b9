"""Index refresh for new notes: step 1 is the shared demo pipeline run (``demo_pipeline``), step 2
the refresh pipeline through kfp.local on a few new notes, in a copy of the run's registry."""

import csv
import io
import os
import pathlib
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest

from components.common.config import resolve
from components.common.readers import read_dataset, write_canonical
from components.common.tracking import create_run
from components.index.run import build_index, load_index, save_index, search
from components.refresh.run import (
    INDEX_URI_TAG,
    RefreshRefused,
    add_vectors,
    download_index,
    grow,
    index_vectors,
)
from components.refresh.run import run as refresh
from pipelines.refresh import run_refresh_local

NAME = "notellm2"


def _unit(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# -- growing an index (no pipeline) -------------------------------------------------------------

@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW8", "IVF4,PQ8x4fs,RFlat"])
def test_grow_appends_only_unknown_ids_and_keeps_old_vectors(tmp_path, factory):
    cfg = resolve("tiny", [f"index.factory={factory}", "index.recall_queries=20"]).index
    old = _unit(200)
    index, meta = build_index(old, cfg, progress=False)
    ids = [f"o{i}" for i in range(200)]
    save_index(index, ids, meta, str(tmp_path / "base"))
    new = _unit(5, seed=1)
    meta2, added = grow(str(tmp_path / "base"), ["o3", "x0", "x1", "x2", "x3"], new,
                        str(tmp_path / "grown"), {"model_name": NAME, "model_version": "1",
                                                  "base_index_uri": "runs:/r/index"})
    assert added == ["x0", "x1", "x2", "x3"] and meta2["ntotal"] == 204  # o3 was indexed
    got_ids, vecs = index_vectors(str(tmp_path / "grown"))
    assert got_ids == ids + added
    np.testing.assert_array_equal(vecs[:200], index_vectors(str(tmp_path / "base"))[1])
    np.testing.assert_allclose(vecs[200:], new[1:], atol=1e-6)
    grown, _, _ = load_index(str(tmp_path / "grown"))
    _, pos = search(grown, new[1:], 1)
    assert [got_ids[p] for p in pos[:, 0]] == added
    assert meta2["refreshes"][-1]["added"] == 4 and meta2["model_version"] == "1"
    _, again = grow(str(tmp_path / "grown"), added, new[1:], str(tmp_path / "again"), {
        "model_name": NAME, "model_version": "1", "base_index_uri": "x"})
    assert again == []


@pytest.mark.parametrize("factory", ["NSG8,Flat", "IDMap,Flat"])
def test_index_that_cannot_grow_is_refused(factory):
    import faiss

    index = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
    if "IDMap" in factory:
        index.add_with_ids(_unit(200), np.arange(200))
    else:
        index.add(_unit(200))
    with pytest.raises(RefreshRefused, match="rebuild"):
        add_vectors(index, _unit(2, seed=3))


# -- the two-step run -------------------------------------------------------------------------

def _new_notes(demo_dir: str, out: str, n: int = 6) -> tuple[list[str], list[str]]:
    """``n`` notes with ids the index has never seen (texts and pictures of the demo generator,
    another seed) plus two rows copied from the demo's training notes, in the official layout:
    ``notes_new.csv`` and ``images/``. Returns (new ids, already indexed ids)."""
    from pipelines.demo_data import make_demo_data

    src = out + "-src"
    make_demo_data(src, notes=4 * n, seed=41)
    os.makedirs(os.path.join(out, "images"))
    with open(os.path.join(src, "notes_train.csv"), encoding="utf-8") as f:
        rows = list(csv.reader(f))[:n]
    new_rows = []
    for i, (_, title, content, imgid, cat) in enumerate(rows):
        shutil.copyfile(os.path.join(src, "images", imgid),
                        os.path.join(out, "images", f"freshimg{i:03d}"))
        new_rows.append([f"fresh{i:03d}", title, content, f"freshimg{i:03d}", cat])
    with open(os.path.join(demo_dir, "notes_train.csv"), encoding="utf-8") as f:
        old_rows = list(csv.reader(f))[:2]
    for row in old_rows:
        shutil.copyfile(os.path.join(demo_dir, "images", row[3]),
                        os.path.join(out, "images", row[3]))
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(new_rows[:3] + old_rows + new_rows[3:])
    with open(os.path.join(out, "notes_new.csv"), "w", encoding="utf-8") as f:
        f.write(buf.getvalue())
    return [r[0] for r in new_rows], [r[0] for r in old_rows]


def _direct_vectors(data: str, ids: list[str]) -> np.ndarray:
    """The new notes through ``models:/notellm2@champion`` as a served pyfunc would see them."""
    notes = read_dataset(data).all_notes().set_index("note_id").loc[ids]
    frame = pd.DataFrame({
        "title": notes["title"].tolist(), "content": notes["content"].tolist(),
        "topics": [",".join(t) for t in notes["topics"]],
        "image": [pathlib.Path(u).read_bytes() for u in notes["image_uri"]]})
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    return np.asarray(model.predict(frame), dtype=np.float32)


@pytest.mark.slow
def test_refresh_adds_new_notes_to_the_champions_index(demo_pipeline, demo_dir, tmp_path,
                                                       monkeypatch):
    work, res = demo_pipeline
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # a copy of the registry, so the shared run stays as it was; the refresh runs go to an
    # experiment of their own, whose artifacts land in the copy
    mine = str(tmp_path / "work")
    os.makedirs(mine)
    shutil.copyfile(os.path.join(work, "mlflow.db"), os.path.join(mine, "mlflow.db"))
    uri = f"sqlite:///{mine}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    if res.decision["decision"] != "promote":  # the shared run promotes (min_eval_queries=5)
        from components.register.promote import promote

        promote(client, NAME, res.decision["version"])
    version = client.get_model_version_by_alias(NAME, "champion")
    v = str(version.version)
    assert INDEX_URI_TAG not in version.tags
    data = str(tmp_path / "new")
    new_ids, old_ids = _new_notes(demo_dir, data)

    out = run_refresh_local(data, mine, experiment="refresh-test")
    rec = out.record
    assert rec["status"] == "published" and rec["model_version"] == v
    assert (rec["notes_given"], rec["skipped_existing"], rec["added"]) == (8, 2, 6)
    base_ids, base_vecs = index_vectors(os.path.join(work, "index"))
    assert rec["base_index_uri"] == f"runs:/{version.run_id}/index"
    assert rec["ntotal_before"] == len(base_ids) and rec["ntotal_after"] == len(base_ids) + 6

    # published: a new run's artifact, named by the version's tag; the registered run untouched
    tags = client.get_model_version(NAME, v).tags
    refresh_run = client.get_run(rec["run_id"])
    assert tags[INDEX_URI_TAG] == f"runs:/{rec['run_id']}/index" == rec["index_uri"]
    assert refresh_run.data.tags["model_version"] == v
    assert refresh_run.data.tags["notellm2.pipeline"] == "refresh"
    assert refresh_run.info.status == "FINISHED"
    assert refresh_run.data.tags["kfp_final_state"] == "SUCCEEDED"
    original = download_index(f"runs:/{version.run_id}/index", uri)
    assert index_vectors(original)[0] == base_ids
    published = download_index(tags[INDEX_URI_TAG], uri)
    ids, vecs = index_vectors(published)

    # old notes: same positions, same vectors, same neighbours among old notes
    assert ids[:len(base_ids)] == base_ids and sorted(ids[len(base_ids):]) == new_ids
    np.testing.assert_array_equal(vecs[:len(base_ids)], base_vecs)
    before, _, _ = load_index(original)
    after, _, _ = load_index(published)
    queries = base_vecs[:40]
    _, p0 = search(before, queries, 10)
    _, p1 = search(after, queries, 10 + 6)
    kept = [[p for p in row if p < len(base_ids)][:10] for row in p1]
    assert kept == p0.tolist()

    # new notes: searchable (each finds itself first), vectors equal the champion's own
    direct = _direct_vectors(data, new_ids)
    where = [ids.index(n) for n in new_ids]
    np.testing.assert_allclose(vecs[where], direct, atol=1e-5)
    _, top = search(after, direct, 1)
    assert [ids[p] for p in top[:, 0]] == new_ids

    # a second refresh with the same notes adds nothing and publishes nothing
    canonical = str(tmp_path / "canonical")
    write_canonical(read_dataset(data), canonical)
    run_id = create_run(uri, "refresh-test", "again", {})
    again = refresh(canonical, str(tmp_path / "again"), resolve("tiny", []), tracking_uri=uri,
                    run_id=run_id)
    assert (again["status"], again["added"], again["skipped_existing"]) == ("unchanged", 0, 8)
    assert client.get_model_version(NAME, v).tags[INDEX_URI_TAG] == \
        rec["index_uri"] == again["index_uri"]

    # an index_uri naming an index of another model version is refused, before any embedding
    other = create_run(uri, "refresh-test", "other", {"model_name": NAME, "model_version": "99"})
    client.log_artifacts(other, published, artifact_path="index")
    client.set_model_version_tag(NAME, v, INDEX_URI_TAG, f"runs:/{other}/index")
    with pytest.raises(RefreshRefused, match="not built with that version"):
        refresh(canonical, str(tmp_path / "other"), resolve("tiny", []), tracking_uri=uri,
                run_id=create_run(uri, "refresh-test", "refused", {}))


def test_ab_plan_arm_follows_the_refreshed_index():
    from types import SimpleNamespace

    from components.register.run import _arm

    class Client:
        tags: dict = {"embed_dim": "64"}

        def get_model_version(self, name, version):
            return SimpleNamespace(run_id="r1", tags=self.tags)

    client = Client()
    assert _arm(client, NAME, "3")["index_uri"] == "runs:/r1/index"
    client.tags = {"embed_dim": "64", INDEX_URI_TAG: "runs:/r9/index"}
    assert _arm(client, NAME, "3")["index_uri"] == "runs:/r9/index"
