"""ingest: read a data folder (official NoteLLM CSV or canonical Parquet/JSONL, local or gs://)
and write canonical Parquet tables; open the pipeline's MLflow run."""

from __future__ import annotations

import logging

from components.common import tracking
from components.common.config import DataConfig
from components.common.readers import read_dataset, write_canonical
from components.common.schema import DataError

log = logging.getLogger(__name__)


def run(data_uri: str, out_dir: str, *, tracking_uri: str = "", experiment: str = "notellm2",
        run_name: str = "", tags: dict[str, str] | None = None,
        cfg: DataConfig | None = None) -> tuple[dict, str]:
    """Returns (manifest, mlflow_run_id). ``cfg``: ``data.encoding`` and the CSV limits."""
    import mlflow

    if not data_uri.strip():
        raise DataError("data_uri is empty: set the pipeline parameter to the data folder "
                        "(a local path or gs://bucket/prefix)")
    run_id = tracking.create_run(tracking_uri, experiment, run_name,
                                 {"data_uri": data_uri, **(tags or {})})
    # the step's run spans the reading, so a refused data folder shows as a FAILED ingest run
    with tracking.step_run(tracking_uri, run_id, "ingest") as step:
        ds = read_dataset(data_uri, cfg)
        for w in ds.warnings:
            log.warning(w)
        manifest = write_canonical(ds, out_dir)
        mlflow.MlflowClient().set_tag(run_id, "data_layout", ds.layout)
        tracking.log_to_pipeline_run(run_id, params={
            "data.uri": data_uri, "data.layout": ds.layout,
            "data.slices": ",".join(ds.slices) or "-"})
        tracking.log_metrics({f"data/notes_{k}": v for k, v in manifest["notes"].items()}
                             | {f"data/pairs_{k}": v for k, v in manifest["pairs"].items()})
        # the canonical tables as MLflow datasets of the pipeline's run and the step's run
        tracking.log_datasets([run_id, step.info.run_id],
                              {f"notes_{k}": v for k, v in ds.notes.items()}
                              | {f"pairs_{k}": v for k, v in ds.pairs.items()}, data_uri)
    log.info("ingested %s (%s layout): notes %s, pairs %s", data_uri, ds.layout,
             manifest["notes"], manifest["pairs"])
    return manifest, run_id
