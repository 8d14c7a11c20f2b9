"""The production decision against a real MLflow server on loopback: a first run is promoted, a
worse challenger is registered but held with its reasons, manual promotion is guarded, rollback
restores the champion, and the champion serves the embed step's vectors."""

import os

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner

from components.common.config import RegisterConfig
from components.register.promote import decide
from pipelines.cli import main
from pipelines.local import run_local
from tests.conftest import assert_tracked_run, mlflow_server, serving_request

pytestmark = pytest.mark.slow
# the test demo holds ~20 test queries: below the production evidence floor
FAST = ("train.max_steps=15", "train.batch_pairs=8", "train.val_every=10",
        "register.min_eval_queries=5")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


def test_promotion_workflow(server, demo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    client = mlflow.MlflowClient(tracking_uri=server)

    first = run_local(demo_dir, str(tmp_path / "first"), overrides=FAST)
    v1 = client.get_model_version_by_alias("notellm2", "champion")
    assert v1.tags["decision"] == "promote" and "no champion yet" in v1.tags["decision_reasons"]
    assert "champion/R@10" not in first.metrics
    # the MLflow side, on the real server: the pipeline run was closed by the exit handler,
    # carries the commit and its data sets, and the logged model holds the evaluation
    assert_tracked_run(client, v1, first.metrics)

    # a deliberately worse challenger: one training step
    second = run_local(demo_dir, str(tmp_path / "second"),
                       overrides=("train.max_steps=1", "train.batch_pairs=8",
                                  "register.min_eval_queries=5"))
    assert second.metrics["champion_version"] == v1.version
    assert "delta/R@10/ci_low" in second.metrics
    v2 = client.get_model_version_by_alias("notellm2", "challenger")
    assert v2.version != v1.version
    assert client.get_model_version_by_alias("notellm2", "champion").version == v1.version
    assert v2.tags["decision"] == "hold"
    assert f"vs champion version {v1.version}" in v2.tags["decision_reasons"]
    assert (tmp_path / "second" / "pipeline_root").exists()

    runner = CliRunner()
    r = runner.invoke(main, ["promote", "--version", v2.version])
    assert r.exit_code == 1 and "not promoted" in r.output
    r = runner.invoke(main, ["promote", "--version", v2.version, "--force"])
    assert r.exit_code == 0, r.output
    assert client.get_model_version_by_alias("notellm2", "champion").version == v2.version
    assert client.get_model_version_by_alias("notellm2", "previous_champion").version == v1.version

    r = runner.invoke(main, ["rollback"])
    assert r.exit_code == 0, r.output
    assert client.get_model_version_by_alias("notellm2", "champion").version == v1.version
    assert "rolled_back" in client.get_model_version("notellm2", v2.version).tags
    r = runner.invoke(main, ["rollback"])  # nothing left to roll back to
    assert r.exit_code == 1 and "previous_champion" in r.output

    # the champion serves what the first run's embed step wrote
    from components.common.readers import read_dataset
    from components.embed.run import read_vectors

    table, vectors = read_vectors(os.path.join(first.work, "embeddings", "notes.parquet"))
    test = read_dataset(demo_dir).notes["test"].head(4)
    served = mlflow.pyfunc.load_model("models:/notellm2@champion").predict(
        serving_request(test))
    by_id = dict(zip(table["note_id"], vectors, strict=True))
    np.testing.assert_allclose(served, np.stack([by_id[n] for n in test["note_id"]]), atol=1e-5)


@pytest.mark.parametrize("status", ["partial", "failed", None])
def test_incomplete_evaluation_never_promotes(status):
    metrics = {"R@10": 0.9, "R@100": 0.99, "status": status}
    d = decide(metrics, RegisterConfig())
    assert not d.promote and "never promoted" in d.reasons[0]


def test_gate_rules():
    cfg = RegisterConfig(max_regression=0.02)
    base = {"status": "complete", "n_queries": 200, "R@100": 0.8, "champion_version": "3",
            "delta/R@100": 0.05, "delta/R@100/ci_low": 0.01, "delta/R@100/ci_high": 0.09}
    assert decide(base, cfg).promote
    assert not decide(base | {"delta/R@100/ci_low": -0.001}, cfg).promote
    held = decide(base | {"delta/slice/short_query/R@100": -0.03}, cfg)
    assert not held.promote and any("slice/short_query regresses" in r for r in held.reasons)
    assert decide(base | {"delta/probe/text_only/R@100": -0.01}, cfg).promote
    first = {"status": "complete", "n_queries": 200, "R@100": 0.05}
    assert not decide(first, cfg).promote and decide(first | {"R@100": 0.5}, cfg).promote
    small = {"status": "complete", "n_queries": 60, "R@10": 0.5, "R@20": 0.7, "pool_size": 40}
    d = decide(small, cfg)
    assert d.metric == "R@20" and "R@100 was not evaluated" in d.reasons[0]
