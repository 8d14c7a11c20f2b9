"""The whole pipeline through kfp.local on a very small data set, and its refusals."""

import json
import os
import shutil

import mlflow
import pytest
from click.testing import CliRunner

from components.common.tracking import step_runs
from pipelines.cli import main
from pipelines.local import PipelineFailed, run_local
from tests.conftest import assert_tracked_run, serving_request

pytestmark = pytest.mark.slow
# the test demo holds ~20 test queries: below the production evidence floor
FAST = ("train.max_steps=15", "train.batch_pairs=8", "train.val_every=10",
        "register.min_eval_queries=5")


@pytest.fixture(autouse=True)
def own_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _versions(work):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    return client.search_model_versions()


def test_pipeline_runs_end_to_end(demo_pipeline, demo_dir):
    work, res = demo_pipeline
    for name in ("metrics.json", "report.md", "model", "embeddings", "index", "mlflow.db"):
        assert os.path.exists(os.path.join(work, name)), name
    with open(os.path.join(work, "metrics.json")) as f:
        m = json.load(f)
    assert m["status"] == "complete" and m["n_queries"] > 0
    for key in ("R@10", "probe/text_only/R@10", "probe/image_only/R@10",
                "slice/image_only_pairs/R@10", "slice/text_only_pairs/R@10",
                "slice/both_pairs/R@10"):
        assert 0.0 <= m[key] <= 1.0, key
    mlflow.set_tracking_uri(res.tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=res.tracking_uri)
    version = client.get_model_version_by_alias("notellm2", "challenger")
    run = client.get_run(version.run_id)
    assert run.data.metrics["R_at_10"] == pytest.approx(m["R@10"])
    assert run.data.params["train.max_steps"] == "15" and run.data.params["data.layout"]
    assert run.data.tags["kfp_run_id"] and run.data.tags["image"] and run.data.tags["git_sha"]
    assert_tracked_run(client, version, m)
    # what the KFP UI shows: reports with the charts embedded, the train task's metrics
    import glob

    from components.evaluate.report import has_relative_images

    root = os.path.join(work, "pipeline_root", "*")
    for name in ("report", "report_html"):
        (path,) = glob.glob(os.path.join(root, "evaluate", name))
        with open(path) as f:
            text = f.read()
        assert "data:image/png;base64," in text and not has_relative_images(text), name
    assert os.path.exists(os.path.join(work, "report.html"))
    # one nested run per step, finished, carrying the pipeline run's tags
    steps = step_runs(res.tracking_uri, run.info.run_id)
    assert set(steps) == {"ingest", "mine_pairs", "validate", "train", "embed", "index",
                          "evaluate", "register", "promote"}  # the first run is promoted
    for name, child in steps.items():
        assert child.info.status == "FINISHED", name
        assert child.data.tags["kfp_run_id"] == run.data.tags["kfp_run_id"], name
    assert "train/loss" in steps["train"].data.metrics
    assert steps["evaluate"].data.metrics["R_at_10"] == pytest.approx(m["R@10"])
    assert steps["index"].data.metrics["index/recall"] >= 0.95
    assert steps["embed"].data.metrics["embed/notes"] > 0
    assert steps["register"].data.tags["decision"] == "promote"
    assert steps["promote"].data.tags["champion"] == steps["register"].data.tags["model_version"]
    # the demo ships events: training pairs were mined and the split recorded
    mined = steps["mine_pairs"].data
    assert mined.params["mine.split.method"] == "time" and mined.params["mine.split.cutoff"]
    assert mined.metrics["mine/pairs_train"] > 0
    import pyarrow.parquet as pq

    emb = pq.read_table(os.path.join(work, "embeddings", "notes.parquet")).to_pandas()
    assert {"note_id", "vector"} <= set(emb.columns)
    # the registered pyfunc returns what the embed step wrote
    import numpy as np

    from components.common.readers import read_dataset

    test = read_dataset(demo_dir).notes["test"].head(5)
    served = mlflow.pyfunc.load_model("models:/notellm2@challenger").predict(
        serving_request(test))
    by_id = dict(zip(emb["note_id"], emb["vector"], strict=True))
    np.testing.assert_allclose(served, np.stack([by_id[n] for n in test["note_id"]]), atol=1e-5)
    n_notes = sum(len(read_dataset(demo_dir).notes[s]) for s in ("train", "test"))
    assert len(emb) == n_notes


def test_unknown_pair_id_stops_before_training(demo_dir, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(demo_dir, bad)
    # the test pairs are kept when training pairs are mined from the events
    with open(os.path.join(bad, "note_pairs_test.csv"), "a") as f:
        f.write("n000001,nosuchnote\n")
    work = str(tmp_path / "badrun")
    with pytest.raises(PipelineFailed, match="validate") as e:
        run_local(bad, work, overrides=FAST)
    # the failing task's own error is quoted, naming file, row, field and id
    assert "note_pairs_test.csv row" in str(e.value) and "nosuchnote" in str(e.value)
    assert not os.path.exists(os.path.join(work, "metrics.json"))
    assert not _versions(work)
    # the exit handler marked the pipeline's MLflow run FAILED with KFP's final state
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("notellm2").experiment_id])
    (run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert run.info.status == "FAILED" and run.data.tags["kfp_final_state"] == "FAILED"
    # the validate step's own run failed too, with the failed expectations as artifacts
    steps = step_runs(f"sqlite:///{work}/mlflow.db", run.info.run_id)
    assert steps["validate"].info.status == "FAILED" and "train" not in steps
    logged = {a.path for a in client.list_artifacts(steps["validate"].info.run_id, "validation")}
    assert "validation/validation.json" in logged
    roots = os.listdir(os.path.join(work, "pipeline_root"))
    assert not os.path.exists(os.path.join(work, "pipeline_root", roots[0], "train"))


def test_cli_refuses_bad_input_clearly(official_dir, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["run-local", "--data", official_dir, "--work", str(tmp_path / "w"),
                             "--set", "train.max_stepz=3"])
    assert r.exit_code == 1 and "train.max_steps" in r.output
    with open(os.path.join(official_dir, "notes_test.csv"), "a") as f:
        f.write("t9,two fields\n")
    r = runner.invoke(main, ["run-local", "--data", official_dir, "--work", str(tmp_path / "w")])
    assert r.exit_code == 1 and "notes_test.csv row 4" in r.output
    assert not _versions(str(tmp_path / "w"))
