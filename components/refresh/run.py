"""refresh: add notes published since the last run to the champion's FAISS index, embedded with the
champion itself, without retraining.

Where the champion's index lives. A registered version's index starts as the ``index/`` artifact
of the pipeline run that registered it (``runs:/<version's run>/index``, logged by ``register``).
A refresh never writes into that run: it logs the grown index as the ``index/`` artifact of its
own MLflow run (the refresh pipeline's run) and then points the version at it with the version
tag ``index_uri`` (plus ``index_ntotal``, ``index_refresh_run``, ``index_refreshed_at``). Whoever
serves version V reads ``index_uri`` of V, or ``runs:/<V's run>/index`` where the tag is absent
(:func:`current_index_uri`). Every refresh's index stays as its run's artifact, so the history
is the chain of ``base_index_uri`` tags of the refresh runs.

What is new. The notes of the data folder whose ids are not in the index's id list
(``ids.parquet``) at the time of the run: the folder may be a delta or the whole catalogue; a
second refresh with the same notes embeds nothing and publishes nothing. An id already in the
index is skipped (counted): the index only grows; a note whose text or picture changed needs a
rebuild (the training pipeline). An id given twice in the new notes is refused by validation.

Same model. The vectors come from ``models:/<name>/<V>``, V the version the alias named when
the run started (resolved once; the alias moving during the run changes nothing of this run).
The index a refresh starts from must belong to V: the original index of V's own run, or a
refreshed index whose ``index.json`` and refresh run both say ``model_version`` = V; and its
width must be V's ``embed_dim``. Anything else is refused.

Publishing is a compare-and-set under the registry lease (:class:`RegistryLock`): if another
refresh moved V's ``index_uri`` since this run read it, this run starts again from the new index
(its vectors are kept, notes the other run added are skipped), at most ``attempts`` times.

Index types. Flat, IVF (any coarse quantizer and codes) and HNSW indexes take ``add`` without
retraining. NSG and NNDescent graphs cannot grow, an IndexIDMap needs explicit ids: these are
refused with a message saying to rebuild (run the training pipeline, or set ``index.factory``).
An IVF index keeps the lists trained on the original notes; :data:`IVF_GROWTH_WARN` warns when
the refreshed index holds far more vectors than it was trained for.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time

import numpy as np
import pandas as pd

from components.common import storage, tracking
from components.common.canonical import load_canonical
from components.common.config import RunConfig
from components.common.schema import DataError

log = logging.getLogger(__name__)

INDEX_URI_TAG = "index_uri"
PIPELINE_TAG = "notellm2.pipeline"
IVF_GROWTH_WARN = 2.0  # refreshed ntotal / ntotal the lists were trained with


class RefreshRefused(RuntimeError):
    """The refresh cannot be done safely (wrong model, an index that cannot grow, …)."""


# -- validation of the new notes ---------------------------------------------------------------

def validate_new(canonical_dir: str, out_dir: str, cfg, validated_dir: str = ""):
    """The ``notes`` and ``images`` suites of ``validate`` on the new notes (pairs and events,
    if any, are not needed and not checked). Notes whose image is broken within
    ``data.max_broken_image_share`` are dropped; the rest is written to ``validated_dir``.
    Raises :class:`DataError` naming file, row and field."""
    from components.common.notes import configure_images
    from components.validate import engine
    from components.validate import run as vrun
    from components.validate.images import check_images
    from components.validate.suites import (
        NOTE_CSV_FIELDS,
        Table,
        images_suite,
        notes_frame,
        notes_suite,
    )

    configure_images(cfg)
    notes, pairs, _ = load_canonical(canonical_dir)
    if not notes or not sum(len(df) for df in notes.values()):
        raise DataError(f"{canonical_dir}: no notes to add (expected notes_<split>.csv or "
                        ".parquet in the data folder)")
    frame = notes_frame(notes)
    images = check_images(frame, cfg.image_check_workers)
    # bool even when no note names an image (an empty object column would index columns)
    images["decodes"] = images["decodes"].astype(bool)
    todo = [Table("notes", frame, notes_suite(cfg), ["_file", "_row", "note_id", "imgid"],
                  NOTE_CSV_FIELDS),
            Table("images", images, images_suite(cfg),
                  ["_file", "_row", "note_id", "image_uri", "problem"], NOTE_CSV_FIELDS)]
    results = engine.validate(todo)
    rep = vrun.report(todo, results, cfg)
    if validated_dir and rep.success:
        vrun._write_validated(canonical_dir, validated_dir, notes, pairs, rep)
    vrun._write(out_dir, rep, todo, results)
    for w in rep.warnings:
        log.warning(w)
    if rep.errors:
        raise DataError("validation of the new notes failed (nothing embedded or published):"
                        "\n  " + "\n  ".join(rep.errors))
    return rep


# -- the champion's index ----------------------------------------------------------------------

def resolve_version(client, name: str, alias: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        raise RefreshRefused(f"no {name}@{alias} in the registry: run the training pipeline "
                             f"(notellm2 run-local) and promote a version first") from None


def current_index_uri(client, name: str, version: str) -> str:
    """The index that serves ``version``: its ``index_uri`` tag, else its own run's ``index``."""
    mv = client.get_model_version(name, version)
    return mv.tags.get(INDEX_URI_TAG) or f"runs:/{mv.run_id}/index"


def _run_of(uri: str) -> str:
    if not uri.startswith("runs:/"):
        raise RefreshRefused(f"index URI {uri!r} is not runs:/<run>/<path>")
    return uri[len("runs:/"):].split("/", 1)[0]


def check_index_model(client, name: str, version: str, uri: str, meta: dict, dim: int) -> None:
    """Refuse an index whose vectors may not come from ``name`` version ``version``."""
    mv = client.get_model_version(name, version)
    run_id = _run_of(uri)
    if run_id != mv.run_id:  # a refreshed index: its run and its index.json must both say so
        tags = client.get_run(run_id).data.tags
        said = {"refresh run tag": tags.get("model_version"),
                "index.json": str(meta.get("model_version", ""))}
        if tags.get("model_name") != name or any(v != version for v in said.values()):
            raise RefreshRefused(
                f"the index {uri} named by {name} version {version}'s {INDEX_URI_TAG} tag was "
                f"not built with that version ({', '.join(f'{k}: {v!r}' for k, v in said.items())}"
                f"); vectors of two models cannot share an index. Remove the tag to start "
                f"again from runs:/{mv.run_id}/index")
    elif meta.get("model_version") not in (None, "", version):
        raise RefreshRefused(f"{uri}: index.json says model version {meta['model_version']}, "
                             f"not {version}")
    if dim and int(meta.get("dim", dim)) != dim:
        raise RefreshRefused(f"{uri}: {meta.get('dim')}-dimensional index, but {name} version "
                             f"{version} makes {dim}-dimensional vectors")


def download_index(uri: str, tracking_uri: str) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(
        artifact_uri=uri, tracking_uri=tracking_uri,
        dst_path=tempfile.mkdtemp(prefix="notellm2-index-"))


# -- growing an index --------------------------------------------------------------------------

_NO_ADD = ("IndexNSG", "IndexNNDescent", "IndexIDMap", "IndexIDMap2")


def addable(index) -> str:
    """"" when ``index.add`` appends vectors at positions ntotal.. without retraining, else why
    not."""
    import faiss

    inner = faiss.downcast_index(index)
    kind = type(inner).__name__
    if kind.startswith(_NO_ADD):
        return (f"a FAISS {kind} cannot take new vectors in place ("
                + ("a graph built once over all vectors" if "ID" not in kind
                   else "it needs explicit ids") + ")")
    if not index.is_trained:
        return f"the FAISS {kind} is not trained"
    return ""


def add_vectors(index, vectors: np.ndarray, batch: int = 65_536) -> None:
    why = addable(index)
    if why:
        raise RefreshRefused(f"{why}: rebuild the index instead (run the training pipeline, or "
                             "choose an index.factory such as Flat, IVF…,Flat or HNSW32)")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    before = index.ntotal
    try:
        for s in range(0, len(vectors), batch):
            index.add(vectors[s:s + batch])
    except RuntimeError as e:
        raise RefreshRefused(f"FAISS refused to add to the index ({e}); rebuild it instead") \
            from None
    if index.ntotal != before + len(vectors):
        raise RefreshRefused(f"the index grew by {index.ntotal - before}, not {len(vectors)}")


def grow(index_dir: str, ids: list[str], vectors: np.ndarray, out_dir: str, record: dict
         ) -> tuple[dict, list[str]]:
    """Copy of the index at ``index_dir`` with the (ids, vectors) it lacks appended, written to
    ``out_dir`` (index.faiss, ids.parquet, index.json). Returns (metadata, ids added)."""
    from components.index.run import check_vectors, load_index, save_index

    index, old_ids, meta = load_index(index_dir)
    known = set(old_ids)
    keep = [i for i, n in enumerate(ids) if n not in known]
    if not keep:
        return meta, []
    add_ids = [ids[i] for i in keep]
    vecs = vectors[keep]
    check_vectors(pd.Series(add_ids), vecs, index.d)
    add_vectors(index, vecs)
    trained = int(meta.get("ntotal_trained", meta.get("ntotal", 0)))
    if meta.get("nlist") and trained and index.ntotal > IVF_GROWTH_WARN * trained:
        log.warning("the IVF index now holds %d vectors, %.1fx the %d its lists were trained "
                    "on: recall may drop; retrain (training pipeline) to rebuild the lists",
                    index.ntotal, index.ntotal / trained, trained)
    history = [*meta.get("refreshes", []), {**record, "added": len(add_ids),
                                            "ntotal": int(index.ntotal)}]
    meta = {**{k: v for k, v in meta.items() if k not in ("index_bytes", "bytes_per_vector")},
            "ntotal": int(index.ntotal), "ntotal_trained": trained, "refreshes": history,
            **{k: record[k] for k in ("model_name", "model_version", "base_index_uri")}}
    return save_index(index, [*old_ids, *add_ids], meta, out_dir), add_ids


# -- the step ----------------------------------------------------------------------------------

def _all_notes(canonical_dir: str) -> pd.DataFrame:
    notes, _, _ = load_canonical(canonical_dir)
    frames = [df.assign(split=s) for s, df in notes.items()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        {c: [] for c in ("note_id", "title", "content", "topics", "image_uri", "split")})


def _index_ids(index_dir: str) -> set[str]:
    from components.common.readers import read_table

    return set(read_table(storage.join(index_dir, "ids.parquet"))["note_id"])


def run(canonical_dir: str, out_dir: str, cfg: RunConfig, *, tracking_uri: str, run_id: str,
        alias: str = "champion", attempts: int = 3, progress: bool = False) -> dict:
    """Embed the new notes of ``canonical_dir`` with ``<model_name>@alias``, add them to that
    version's index, log the grown index to the run ``run_id`` and point the version's
    ``index_uri`` at it. Writes ``refresh.json`` (and ``index/`` when it grew) to ``out_dir``;
    returns that record (``status``: "published" or "unchanged")."""
    import mlflow

    from components.common.notes import LazyNotes, configure_images
    from components.evaluate.compare import download_model
    from components.register.promote import RegistryLock
    from model import NoteLLM2, encode

    uri = tracking.tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    name = cfg.register.model_name
    version = resolve_version(client, name, alias)
    dim = int(client.get_model_version(name, version).tags.get("embed_dim", 0) or 0)
    notes = _all_notes(canonical_dir)
    record = {"model_name": name, "model_version": version, "alias": alias, "run_id": run_id,
              "notes_given": len(notes), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    base = current_index_uri(client, name, version)
    base_dir = download_index(base, uri)
    meta = json.loads(storage.read_text(storage.join(base_dir, "index.json")))
    check_index_model(client, name, version, base, meta, dim)
    new = notes[~notes["note_id"].isin(_index_ids(base_dir))].reset_index(drop=True)
    record |= {"base_index_uri": base, "ntotal_before": int(meta.get("ntotal", 0)),
               "skipped_existing": len(notes) - len(new)}
    vecs = np.zeros((0, max(dim, 1)), np.float32)
    if len(new):
        configure_images(cfg.data)
        model = NoteLLM2.from_pretrained(download_model(f"models:/{name}/{version}", uri))
        t0 = time.perf_counter()
        vecs = encode(model, LazyNotes(new), batch_size=cfg.embed.batch_size, progress=progress,
                      desc="embed new notes")
        record["embed_notes_per_s"] = round(len(new) / max(1e-9, time.perf_counter() - t0), 2)
    ids = new["note_id"].tolist()
    published = ""
    for key, value in {PIPELINE_TAG: "refresh", "model_name": name, "model_version": version,
                       "model_alias": alias}.items():  # the run says which version it serves
        client.set_tag(run_id, key, value)
    for attempt in range(attempts):
        index_out = storage.join(out_dir, "index")
        grown, added = grow(base_dir, ids, vecs, index_out, {
            k: record[k] for k in ("model_name", "model_version", "run_id", "at")}
            | {"base_index_uri": base})
        record |= {"added": len(added), "ntotal_after": int(grown.get("ntotal", 0)),
                   "added_ids": added[:1000], "base_index_uri": base,  # after a retry: the
                   "ntotal_before": int(grown.get("ntotal", 0)) - len(added)}  # one grown
        if not added:
            break
        client.log_artifacts(run_id, index_out, artifact_path="index")
        mine = f"runs:/{run_id}/index"
        with RegistryLock(client, name):  # compare-and-set of the version's index_uri
            now = current_index_uri(client, name, version)
            if now == base:
                for key, value in {INDEX_URI_TAG: mine, "index_ntotal": str(grown["ntotal"]),
                                   "index_refresh_run": run_id,
                                   "index_refreshed_at": record["at"]}.items():
                    client.set_model_version_tag(name, version, key, value)
                published = mine
                break
        log.warning("%s version %s's index moved to %s during this refresh (attempt %d): "
                    "starting again from it", name, version, now, attempt + 1)
        base, base_dir = now, download_index(now, uri)
        check_index_model(client, name, version, base, json.loads(
            storage.read_text(storage.join(base_dir, "index.json"))), dim)
    else:
        raise RefreshRefused(f"{name} version {version}'s index moved {attempts} times during "
                             "this refresh; nothing published, run it again")
    if not published:
        record["added"] = 0
    record |= {"status": "published" if published else "unchanged",
               "index_uri": published or base}
    try:
        champion_now = resolve_version(client, name, alias)
    except RefreshRefused:
        champion_now = ""
    if champion_now != version:
        log.warning("%s@%s moved from version %s to %s during this refresh: version %s's index "
                    "was refreshed; the next refresh adds these notes to version %s's", name,
                    alias, version, champion_now or "none", version, champion_now or "-")
        record["alias_moved_to"] = champion_now
    for key in ("base_index_uri", "index_uri", "status"):
        client.set_tag(run_id, f"refresh_{key}" if key == "status" else key, record[key])
    tracking.log_to_pipeline_run(run_id, metrics={f"refresh/{k}": record[k] for k in (
        "notes_given", "skipped_existing", "added", "ntotal_before", "ntotal_after",
        "embed_notes_per_s") if k in record})
    client.log_dict(run_id, record, "refresh/refresh.json")
    storage.write_text(storage.join(out_dir, "refresh.json"), json.dumps(record, indent=2))
    log.info("refresh of %s version %s: %d new note(s) added (%d already indexed), index %s "
             "(%s)", name, version, record["added"], record["skipped_existing"],
             record["index_uri"], record["status"])
    return record


def index_vectors(index_dir: str) -> tuple[list[str], np.ndarray]:
    """(ids, (N, d) stored vectors) of an index folder, for checks and tests."""
    import faiss

    from components.index.run import load_index

    index, ids, _ = load_index(index_dir)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()
    return ids, index.reconstruct_n(0, index.ntotal)

