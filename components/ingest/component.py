from kfp import dsl
from kfp.dsl import Dataset, Output

from components.common.image import component_image


@dsl.component(base_image=component_image(), install_kfp_package=False)
def ingest(data_uri: str, preset: str, overrides: list, mlflow_tracking_uri: str,
           mlflow_experiment: str, run_name: str, kfp_run_id: str, image: str,
           canonical: Output[Dataset]) -> str:
    """Read notes, pairs and events (official NoteLLM CSV or canonical Parquet, local or gs://)
    into canonical Parquet; open the pipeline's MLflow run and return its id."""
    from components.common import logs
    from components.common.config import resolve
    from components.common.image import git_sha
    from components.ingest.run import run

    logs.setup()
    manifest, run_id = run(data_uri, canonical.path, tracking_uri=mlflow_tracking_uri,
                           experiment=mlflow_experiment, run_name=run_name,
                           tags={"kfp_run_id": kfp_run_id, "image": image,
                                 "git_sha": git_sha()},
                           cfg=resolve(preset, overrides).data)
    canonical.metadata.update({"notes": manifest["notes"], "pairs": manifest["pairs"]})
    return run_id


@dsl.component(base_image=component_image(), install_kfp_package=False)
def finish_run(mlflow_tracking_uri: str, mlflow_experiment: str, kfp_run_id: str,
               status: dsl.PipelineTaskFinalStatus) -> str:
    """Exit handler: marks the pipeline's MLflow run FAILED when any task failed."""
    from components.common import logs, tracking

    logs.setup()
    return tracking.finish_run(mlflow_tracking_uri, mlflow_experiment, kfp_run_id, status.state,
                               status.error_message or "")
