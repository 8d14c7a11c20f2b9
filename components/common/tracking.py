"""MLflow helpers: where the store is, one run per pipeline run with a nested run per step,
metric names MLflow accepts.

The pipeline's run (made by ``ingest``) holds what describes and decides the run: the data and
config parameters, the evaluation's headline metrics and the logged model that the registry's
versions point to. Each step logs what it measured and wrote into a child run named after it
(:func:`step_run`); an exception inside marks that child FAILED, and the pipeline's exit handler
marks the pipeline's run FAILED when any task failed.
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


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    clean = {metric_key(k): float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if clean:
        mlflow.log_metrics(clean, step=step)


@contextmanager
def pipeline_run(uri: str, run_id: str) -> Iterator[object]:
    """Re-open the pipeline's MLflow run inside a step."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(uri))
    with mlflow.start_run(run_id=run_id) as run:
        yield run


# tags a step's run copies from the pipeline's run, so either can be found by them
INHERITED_TAGS = ("kfp_run_id", "git_sha", "image")
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


def create_run(uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> str:
    """Create the pipeline's run (in ``ingest``) and return its id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(uri))
    exp = mlflow.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(experiment)
    client = mlflow.MlflowClient()
    run = client.create_run(exp_id, run_name=run_name or None,
                            tags={k: v for k, v in tags.items() if v})
    client.set_terminated(run.info.run_id, status="FINISHED")
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
