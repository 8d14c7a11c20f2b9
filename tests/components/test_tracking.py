"""The MLflow run structure: one run per pipeline run, a nested run per step."""

import json

import mlflow
import pytest

from components.common import tracking


@pytest.fixture()
def uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture(autouse=True)
def no_kfp_ui(monkeypatch):
    monkeypatch.delenv(tracking.KFP_UI_ENV, raising=False)


def _pipeline_run(uri: str, kfp_run_id: str = "kfp-1") -> str:
    return tracking.create_run(uri, "exp", "nightly", {"kfp_run_id": kfp_run_id,
                                                       "git_sha": "abc123", "image": "img:1"})


def test_steps_nest_under_the_pipeline_run_and_a_retry_reopens_its_step(uri):
    parent = _pipeline_run(uri)
    with tracking.step_run(uri, parent, "train"):
        tracking.log_metrics({"train/loss": 2.0}, step=1)
        tracking.log_to_pipeline_run(parent, params={"train.lr": 0.1}, metrics={"R@10": 0.5})
    with tracking.step_run(uri, parent, "train"):  # the task's second attempt
        tracking.log_metrics({"train/loss": 1.0}, step=2)
    with tracking.step_run(uri, parent, "index"):
        pass

    steps = tracking.step_runs(uri, parent)
    assert set(steps) == {"train", "index"}
    train = steps["train"]
    assert train.data.tags[tracking.PARENT_TAG] == parent and train.info.run_name == "train"
    assert {k: train.data.tags[k] for k in tracking.INHERITED_TAGS
            if k in train.data.tags} == {
        "kfp_run_id": "kfp-1", "git_sha": "abc123", "image": "img:1",
        "mlflow.source.git.commit": "abc123"}
    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history(train.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.0)]
    top = client.get_run(parent).data
    assert top.params["train.lr"] == "0.1" and top.metrics["R_at_10"] == 0.5
    assert "train/loss" not in top.metrics


def test_a_failing_step_fails_its_run_and_the_exit_handler_fails_the_pipeline_run(uri):
    parent = _pipeline_run(uri)
    other = _pipeline_run(uri, "kfp-2")
    with tracking.step_run(uri, parent, "ingest"):
        pass
    with pytest.raises(ValueError), tracking.step_run(uri, parent, "validate"):
        raise ValueError("bad row")
    client = mlflow.MlflowClient(uri)
    # a pod killed mid-step leaves its run RUNNING
    stuck = client.create_run(client.get_run(parent).info.experiment_id, run_name="train",
                              tags={tracking.PARENT_TAG: parent, tracking.STEP_TAG: "train",
                                    "kfp_run_id": "kfp-1"}).info.run_id

    assert tracking.finish_run(uri, "exp", "kfp-1", "FAILED", "validate failed") == "FAILED"
    steps = tracking.step_runs(uri, parent)
    assert {k: r.info.status for k, r in steps.items()} == {
        "ingest": "FINISHED", "validate": "FAILED", "train": "KILLED"}
    assert steps["train"].info.run_id == stuck
    top = client.get_run(parent)
    assert top.info.status == "FAILED" and top.data.tags["kfp_error"] == "validate failed"
    assert client.get_run(other).info.status == "RUNNING"  # another pipeline run is untouched
    assert tracking.finish_run(uri, "exp", "kfp-2", "SUCCEEDED") == "FINISHED"
    assert tracking.finish_run(uri, "exp", "kfp-unknown", "FAILED") == ""


def test_a_step_without_a_pipeline_run_gets_a_top_level_run(uri):
    with tracking.step_run(uri, "", "train") as run:
        tracking.log_to_pipeline_run("", params={"train.lr": 0.1})
    got = mlflow.MlflowClient(uri).get_run(run.info.run_id)
    assert tracking.PARENT_TAG not in got.data.tags and got.data.params["train.lr"] == "0.1"


def test_a_refused_data_folder_leaves_a_failed_ingest_run(uri, tmp_path):
    from components.common.schema import DataError
    from components.ingest.run import run as ingest

    empty = tmp_path / "nodata"
    empty.mkdir()
    with pytest.raises(DataError):
        ingest(str(empty), str(tmp_path / "canon"), tracking_uri=uri, experiment="exp",
               tags={"kfp_run_id": "kfp-9"})
    assert tracking.finish_run(uri, "exp", "kfp-9", "FAILED") == "FAILED"
    client = mlflow.MlflowClient(uri)
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("exp")
                                                .experiment_id])
                 if tracking.PARENT_TAG not in r.data.tags]
    steps = tracking.step_runs(uri, parent.info.run_id)
    assert steps["ingest"].info.status == "FAILED" and parent.info.status == "FAILED"


def test_the_pipeline_run_stays_running_until_the_exit_handler_closes_it(uri):
    client = mlflow.MlflowClient(uri)
    ok, bad = _pipeline_run(uri, "kfp-ok"), _pipeline_run(uri, "kfp-bad")
    assert client.get_run(ok).info.status == "RUNNING"
    with tracking.step_run(uri, ok, "train"):
        tracking.log_to_pipeline_run(ok, params={"train.lr": 0.1})
    # register re-opens the pipeline's run for the fluent API: leaving it keeps RUNNING
    with tracking.pipeline_run(uri, ok):
        mlflow.log_metric("R_at_10", 0.5)
    with pytest.raises(RuntimeError), tracking.pipeline_run(uri, bad):
        raise RuntimeError("register failed")
    assert mlflow.active_run() is None
    assert client.get_run(ok).info.status == "RUNNING"
    assert client.get_run(bad).info.status == "RUNNING"
    assert tracking.step_runs(uri, ok)["train"].info.status == "FINISHED"
    # the exit handler decides, from KFP's final state
    assert tracking.finish_run(uri, "exp", "kfp-ok", "SUCCEEDED") == "FINISHED"
    assert tracking.finish_run(uri, "exp", "kfp-bad", "FAILED", "register failed") == "FAILED"
    done = client.get_run(ok)
    assert done.info.status == "FINISHED" and done.info.end_time >= done.info.start_time
    assert done.data.metrics["R_at_10"] == 0.5
    assert client.get_run(bad).info.status == "FAILED"


def test_runs_carry_the_git_commit_and_a_link_to_their_kfp_run(uri, monkeypatch):
    monkeypatch.setenv(tracking.KFP_UI_ENV, "https://kfp.example.com/pipeline/")
    parent = _pipeline_run(uri, "0d9c-run")
    with tracking.step_run(uri, parent, "embed"):
        pass
    url = "https://kfp.example.com/pipeline/#/runs/details/0d9c-run"
    for run in (mlflow.MlflowClient(uri).get_run(parent),
                tracking.step_runs(uri, parent)["embed"]):
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == "abc123" and tags["git_sha"] == "abc123"
        assert tags["kfp_run_url"] == url and tags["kfp_run_id"] == "0d9c-run"
    # no UI known (kfp.local) or no commit known: no such tag rather than a wrong one
    monkeypatch.delenv(tracking.KFP_UI_ENV)
    assert tracking.run_tags({"kfp_run_id": "x", "git_sha": "unknown"}) == {
        "kfp_run_id": "x", "git_sha": "unknown"}


def test_ingest_logs_the_data_as_mlflow_datasets(uri, official_dir, tmp_path):
    from components.ingest.run import run as ingest

    _, parent = ingest(official_dir, str(tmp_path / "canon"), tracking_uri=uri,
                       experiment="exp", tags={"kfp_run_id": "kfp-d"})
    client = mlflow.MlflowClient(uri)
    for run in (client.get_run(parent), tracking.step_runs(uri, parent)["ingest"]):
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert {"notes_train", "notes_test", "pairs_train", "pairs_test"} <= set(inputs)
        ctx = {n: {t.key: t.value for t in d.tags}["mlflow.data.context"]
               for n, d in inputs.items()}
        assert ctx["notes_train"] == ctx["pairs_train"] == "training"
        assert ctx["notes_test"] == ctx["pairs_test"] == "testing"
        pairs = inputs["pairs_train"].dataset
        assert official_dir in pairs.source and pairs.digest
        assert json.loads(pairs.profile)["num_rows"] > 0
    assert client.get_run(parent).info.status == "RUNNING"


def test_register_links_the_evaluation_metrics_to_the_logged_model(uri, tmp_path):
    from tests.faults.registry_kit import register_version

    run_id, out = register_version(uri, str(tmp_path / "v1"), hits=30)
    client = mlflow.MlflowClient(uri)
    mv = client.get_model_version(out["name"], out["version"])
    model = client.get_logged_model(mv.source.removeprefix("models:/"))
    linked = {m.key: m.value for m in model.metrics}
    assert linked["R_at_10"] == 0.5 and linked["n_queries"] == 60
    assert all(m.run_id == run_id for m in model.metrics)
    run = client.get_run(run_id)  # the run's metrics as before, and still open
    assert run.data.metrics["R_at_10"] == 0.5 and run.info.status == "RUNNING"
    assert [m.value for m in client.get_metric_history(run_id, "R_at_10")] == [0.5]
