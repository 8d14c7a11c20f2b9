"""MLflow helpers: where the store is, one run per pipeline run, metric names MLflow accepts.

Steps open the pipeline's run by id and close it again; an exception inside marks it FAILED.
"""

from __future__ import annotations

import os
import re
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
    died without running any Python). Returns the MLflow status set, or "" when ingest failed
    before creating a run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(uri))
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.kfp_run_id = '{kfp_run_id}'",
                              max_results=1) if exp else []
    if not runs:
        return ""
    run_id = runs[0].info.run_id
    client.set_tag(run_id, "kfp_final_state", state)
    if state == "SUCCEEDED":
        client.set_terminated(run_id, status="FINISHED")
        return "FINISHED"
    if error:
        client.set_tag(run_id, "kfp_error", error[:5000])
    client.set_terminated(run_id, status="FAILED")
    return "FAILED"
