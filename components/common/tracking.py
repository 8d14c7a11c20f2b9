"""MLflow helpers: where the store is, one run per pipeline run with a nested run per step,
metric names MLflow accepts.

The pipeline's run (made by ``ingest``) holds what describes and decides the run: the data and
config parameters, the data sets as MLflow dataset inputs, the evaluation's headline metrics and
the logged model that the registry's versions point to. It stays RUNNING while the pipeline runs:
only the exit handler (:func:`finish_run`) ends it, FINISHED or FAILED from KFP's final state; a
step that re-opens it (:func:`pipeline_run`) leaves its status alone. Each step logs what it
measured and wrote into a child run named after it (:func:`step_run`); an exception inside marks
that child FAILED.

Both carry the KFP run id (``kfp_run_id``), a link to the run in the KFP UI (``kfp_run_url``,
when ``$KFP_UI_URL`` names the UI), the source commit (``mlflow.source.git.commit``, which the
MLflow UI shows, and ``git_sha``) and the image.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

ENV = "MLFLOW_TRACKING_URI"


def tracking_uri(explicit: str = "") -> str:
    uri = explicit or os.environ.get(ENV, "")
    if not uri:
        raise RuntimeError("no MLflow tracking URI: pass mlflow_tracking_uri or set "
                           f"{ENV} (e.g. from a Kubernetes secret)")
    return uri


def metric_key(key: str) -> str:
    """MLflow metric names allow ``[/\\w.\\- :]``: ``R@10`` is logged as ``R_at_10``."""
    return re.sub(r"[^/\w.\- :]", "_", key.replace("@", "_at_"))


def log_numbers(record: dict, prefix: str = "") -> None:
    """The int and float values of a step's record (``index.json``, ``embed.json``, …) as
    metrics of the active run."""
    log_metrics({prefix + k: v for k, v in record.items()})


def log_metrics(metrics: dict[str, float], step: int | None = None,
                model_id: str | None = None) -> None:
    """The int and float values as metrics of the active run; with ``model_id`` also linked to
    that logged model (MLflow 3: they show on the model's page too)."""
    import mlflow

    clean = {metric_key(k): float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if clean:
        mlflow.log_metrics(clean, step=step, model_id=model_id)


@contextmanager
def pipeline_run(uri: str, run_id: str) -> Iterator[object]:
    """Re-open the pipeline's MLflow run as the active run inside a step (for the fluent API:
    ``log_model``, ``log_artifacts``). Leaving it, also by an exception, keeps the run's status:
    the pipeline's run is only ended by the exit handler. (The fluent ``end_run`` sets a status
    and an end time; the end time is overwritten when the exit handler ends the run.)"""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(uri))
    client = mlflow.MlflowClient()
    status = client.get_run(run_id).info.status
    run = mlflow.start_run(run_id=run_id)  # sets RUNNING
    try:
        yield run
    finally:
        mlflow.end_run(status=status)  # pops the fluent run, status unchanged


# tags a step's run copies from the pipeline's run, so either can be found by them
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # the MLflow UI shows it as the run's source version
KFP_UI_ENV = "KFP_UI_URL"  # e.g. https://kubeflow.example.com/pipeline (the UI's base URL)
KFP_URL_TAG = "kfp_run_url"
INHERITED_TAGS = ("kfp_run_id", KFP_URL_TAG, "git_sha", GIT_COMMIT_TAG, "image")
PARENT_TAG = "mlflow.parentRunId"  # how MLflow (and its UI) nests runs
STEP_TAG = "kfp_step"


@contextmanager
def step_run(uri: str, parent_id: str, step: str) -> Iterator[object]:
    """The active MLflow run of one pipeline step: a child of the pipeline's run, named after the
    step (a top-level run when there is no pipeline run). A retried task (a restarted pod, a resumed training) re-opens the same child, so its
    metric history spans every attempt."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(uri))
    if not parent_id:  # a step run on its own (a notebook, a test): a top-level run
        with mlflow.start_run(run_name=step, tags={STEP_TAG: step}) as run:
            yield run
        return
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_id)
    found = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.{STEP_TAG} = '{step}'", max_results=1)
    if found:
        child_id = found[0].info.run_id
    else:
        tags = {k: v for k, v in parent.data.tags.items() if k in INHERITED_TAGS}
        child_id = client.create_run(parent.info.experiment_id, run_name=step, tags=tags | {
            PARENT_TAG: parent_id, STEP_TAG: step}).info.run_id
    with mlflow.start_run(run_id=child_id) as run:
        yield run


def step_runs(uri: str, parent_id: str) -> dict[str, object]:
    """The step runs of a pipeline run by step name (for tests, ``notellm2`` and notebooks)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(uri))
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'")
    return {r.data.tags.get(STEP_TAG, r.info.run_name): r for r in runs}


def log_to_pipeline_run(parent_id: str, params: dict | None = None,
                        metrics: dict[str, float] | None = None) -> None:
    """Parameters and metrics for the pipeline's run while a step's run is the active one."""
    import mlflow
    from mlflow.entities import Metric, Param

    client = mlflow.MlflowClient()
    parent_id = parent_id or mlflow.active_run().info.run_id  # a step run on its own
    now = int(time.time() * 1000)
    ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    ms = [Metric(metric_key(k), float(v), now, 0) for k, v in (metrics or {}).items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for i in range(0, max(len(ps), len(ms)), 100):  # MLflow takes 100 parameters a batch
        client.log_batch(parent_id, params=ps[i:i + 100], metrics=ms[i:i + 100])


def kfp_run_url(kfp_run_id: str, ui_url: str | None = None) -> str:
    """The KFP UI page of a run: ``<ui>/#/runs/details/<id>`` with ``ui`` from ``$KFP_UI_URL``;
    "" when no UI is known (``kfp.local``) or there is no run id."""
    ui = (os.environ.get(KFP_UI_ENV, "") if ui_url is None else ui_url).strip().rstrip("/")
    return f"{ui}/#/runs/details/{kfp_run_id}" if ui and kfp_run_id else ""


def run_tags(tags: dict[str, str]) -> dict[str, str]:
    """The pipeline run's tags with what MLflow and the KFP UI link by: the commit also as
    ``mlflow.source.git.commit``, the KFP run's page as ``kfp_run_url``."""
    out = dict(tags)
    sha = out.get("git_sha", "")
    if sha and sha != "unknown":
        out.setdefault(GIT_COMMIT_TAG, sha)
    if url := kfp_run_url(out.get("kfp_run_id", "")):
        out.setdefault(KFP_URL_TAG, url)
    return {k: v for k, v in out.items() if v}


def create_run(uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> str:
    """Create the pipeline's run (in ``ingest``) and return its id. It stays RUNNING until the
    exit handler (:func:`finish_run`) ends it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(uri))
    exp = mlflow.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(experiment)
    client = mlflow.MlflowClient()
    run = client.create_run(exp_id, run_name=run_name or None, tags=run_tags(tags))
    return run.info.run_id


def finish_run(uri: str, experiment: str, kfp_run_id: str, state: str, error: str = "") -> str:
    """The pipeline's exit handler: find the pipeline's run by its ``kfp_run_id`` tag, record
    KFP's final state on it and mark it FAILED unless every task succeeded (also when a pod
    died without running any Python; a step run such a pod left RUNNING becomes KILLED).
    Returns the MLflow status set, or "" when ingest failed before creating a run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(uri))
    exp = client.get_experiment_by_name(experiment)
    # the step runs carry the tag too
    runs = client.search_runs([exp.experiment_id], f"tags.kfp_run_id = '{kfp_run_id}'") \
        if exp else []
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    if not parents:
        return ""
    run_id = parents[0].info.run_id
    client.set_tag(run_id, "kfp_final_state", state)
    if state == "SUCCEEDED":
        client.set_terminated(run_id, status="FINISHED")
        return "FINISHED"
    if error:
        client.set_tag(run_id, "kfp_error", error[:5000])
    for r in runs:
        if r.info.status == "RUNNING" and r.data.tags.get(PARENT_TAG) == run_id:
            client.set_terminated(r.info.run_id, status="KILLED")
    client.set_terminated(run_id, status="FAILED")
    return "FAILED"


def dataset_context(name: str) -> str:
    """MLflow's dataset context of a table ``<kind>_<split>[_<slice>]``: ``training``,
    ``testing`` (the test split and its slices), else the split's own name."""
    split = (name.split("_") + [""])[1]
    return {"train": "training", "test": "testing"}.get(split, split)


def log_datasets(run_ids: list[str], tables: dict[str, object], source: str) -> None:
    """Log data frames as MLflow dataset inputs of each run: name, digest, schema and row count
    (not the rows), with ``source`` (the data folder: local path or gs://) as where they came
    from and the context from the name (:func:`dataset_context`). The MLflow UI lists them in
    the run's "Datasets used"."""
    import warnings

    import mlflow
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    with warnings.catch_warnings():  # integer columns, an ambiguous local source
        warnings.simplefilter("ignore", UserWarning)
        for name, df in tables.items():
            ds = mlflow.data.from_pandas(df, source=source, name=name)
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[
                InputTag(MLFLOW_DATASET_CONTEXT, dataset_context(name))]))
    client = mlflow.MlflowClient()
    for run_id in run_ids:
        client.log_inputs(run_id, datasets=inputs)
