"""Issue 15, items 1, 3 and 4: promotion is a compare-and-set, retries change nothing, the
``challenger`` alias never points at an undecided version, and evaluation refuses data that
would measure training notes. A real MLflow store (SQLite) throughout."""

from __future__ import annotations

import os
import shutil

import mlflow
import pytest

from components.common.schema import DataError
from components.register.promote import CHAMPION, PREVIOUS, promote_checked
from tests.faults.registry_kit import CFG, register_version

pytestmark = pytest.mark.faults
NAME = CFG.model_name


@pytest.fixture()
def uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def _alias(client, alias):
    return str(client.get_model_version_by_alias(NAME, alias).version)


@pytest.mark.parametrize("first", ["worse", "better"])
def test_two_runs_decided_against_the_same_champion_end_with_the_better(uri, tmp_path, first):
    client = mlflow.MlflowClient(uri)
    _, v1 = register_version(uri, str(tmp_path / "v1"), hits=20)
    promote_checked(client, NAME, v1["version"], "", CFG)
    # both compared with v1 and both pass the gate against it
    _, worse = register_version(uri, str(tmp_path / "worse"), 35, (v1["version"], 20))
    _, better = register_version(uri, str(tmp_path / "better"), 55, (v1["version"], 20))
    assert worse["decision"] == better["decision"] == "promote"
    order = [worse, better] if first == "worse" else [better, worse]
    results = [promote_checked(client, NAME, v["version"], v1["version"], CFG) for v in order]

    assert _alias(client, CHAMPION) == better["version"]
    if first == "worse":  # the better one was decided again against the worse and won
        assert results[1]["promoted"] and _alias(client, PREVIOUS) == worse["version"]
        tags = client.get_model_version(NAME, better["version"]).tags
        assert tags["redecided_against"] == worse["version"]
    else:  # the worse one lost the re-decision against the better: held, with the reason
        assert not results[1]["promoted"] and _alias(client, PREVIOUS) == v1["version"]
        tags = client.get_model_version(NAME, worse["version"]).tags
        assert tags["decision"] == "hold"
        assert f"moved from {v1['version']} to {better['version']}" in tags["promotion_refused"]


def test_a_stale_decision_without_comparable_ranks_is_held(uri, tmp_path):
    client = mlflow.MlflowClient(uri)
    _, v1 = register_version(uri, str(tmp_path / "v1"), hits=20)
    promote_checked(client, NAME, v1["version"], "", CFG)
    _, v2 = register_version(uri, str(tmp_path / "v2"), 40, (v1["version"], 20))
    _, v3 = register_version(uri, str(tmp_path / "v3"), 50, (v1["version"], 20))
    promote_checked(client, NAME, v3["version"], v1["version"], CFG)
    run_id = client.get_model_version(NAME, v3["version"]).run_id
    client.log_text(run_id, "{}", "evaluation/query_ranks.parquet")  # unreadable ranks
    out = promote_checked(client, NAME, v2["version"], v1["version"], CFG)
    assert not out["promoted"] and _alias(client, CHAMPION) == v3["version"]
    assert "no per-query ranks" in client.get_model_version(
        NAME, v2["version"]).tags["promotion_refused"]


def test_a_retried_promotion_leaves_previous_champion_right(uri, tmp_path, monkeypatch):
    client = mlflow.MlflowClient(uri)
    _, v1 = register_version(uri, str(tmp_path / "v1"), hits=20)
    promote_checked(client, NAME, v1["version"], "", CFG)
    _, v2 = register_version(uri, str(tmp_path / "v2"), 50, (v1["version"], 20))

    real = mlflow.MlflowClient.set_registered_model_alias
    calls = []

    def dies_once(self, name, alias, version):  # the pod dies after its first alias write
        real(self, name, alias, version)
        calls.append(alias)
        if len(calls) == 1:
            raise ConnectionError("task killed")

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", dies_once)
    with pytest.raises(ConnectionError):
        promote_checked(client, NAME, v2["version"], v1["version"], CFG)
    out = promote_checked(client, NAME, v2["version"], v1["version"], CFG)  # KFP's retry
    again = promote_checked(client, NAME, v2["version"], v1["version"], CFG)
    assert out["promoted"] and again["promoted"]
    assert _alias(client, CHAMPION) == v2["version"] and _alias(client, PREVIOUS) == v1["version"]


def test_a_retried_register_reuses_its_version(uri, tmp_path):
    client = mlflow.MlflowClient(uri)
    run_id, first = register_version(uri, str(tmp_path / "a"), hits=30)
    _, again = register_version(uri, str(tmp_path / "a"), hits=30, run_id=run_id)
    assert again["version"] == first["version"]
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1


def test_challenger_never_points_at_a_version_without_its_decision(uri, tmp_path, monkeypatch):
    real = mlflow.MlflowClient.set_registered_model_alias
    seen = []

    def check(self, name, alias, version):
        seen.append((alias, dict(self.get_model_version(name, version).tags)))
        real(self, name, alias, version)

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", check)
    register_version(uri, str(tmp_path / "a"), hits=30)
    alias, tags = seen[0]
    assert alias == "challenger"
    assert {"decision", "decision_reasons", "run_id", "embed_dim"} <= set(tags)


def _canonical(official: str, out: str) -> str:
    from components.ingest.run import run as ingest

    ingest(official, out)
    return out


def test_evaluation_without_test_notes_is_refused(official_dir, tmp_path):
    from components.common.config import EvalConfig
    from components.evaluate.run import run as evaluate

    os.remove(os.path.join(official_dir, "notes_test.csv"))
    shutil.rmtree(os.path.join(official_dir, "images_test"))
    with open(os.path.join(official_dir, "note_pairs_test.csv"), "w") as f:
        f.write("a3,a4\n")
    with open(os.path.join(official_dir, "note_pairs_test_shortquery.csv"), "w") as f:
        f.write("a3,a4\n")
    canonical = _canonical(official_dir, str(tmp_path / "canonical"))
    with pytest.raises(DataError, match="no test notes"):
        evaluate(canonical, str(tmp_path / "emb"), str(tmp_path / "eval"), EvalConfig())


def test_a_note_in_train_and_test_pairs_is_a_leak(official_dir, tmp_path):
    from components.common.config import DataConfig
    from components.validate.run import run as validate

    with open(os.path.join(official_dir, "note_pairs_train.csv"), "a") as f:
        f.write("\na1,t3\n")  # t3 is evaluated below
    with open(os.path.join(official_dir, "note_pairs_test.csv"), "a") as f:
        f.write("t3,t1\n")
    canonical = _canonical(official_dir, str(tmp_path / "canonical"))
    with pytest.raises(DataError, match=r"note_pairs_test.csv.*'t3'.*also in the train pairs"):
        validate(canonical, str(tmp_path / "report"), DataConfig(max_broken_image_share=1.0))
