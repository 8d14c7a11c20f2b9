from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Output

from components.common.image import component_image


@dsl.component(base_image=component_image(), install_kfp_package=False)
def validate_new_notes(canonical: Input[Dataset], preset: str, overrides: list,
                       mlflow_tracking_uri: str, mlflow_run_id: str, report: Output[Artifact],
                       data_docs: Output[HTML], validated: Output[Dataset]):
    """The notes and images suites of ``validate`` on the notes to add; fails the run (nothing
    embedded or published) with file, row and field of what to fix."""
    import os
    import shutil

    import mlflow

    from components.common import logs, tracking
    from components.common.config import resolve
    from components.refresh.run import validate_new

    logs.setup()
    try:
        with tracking.step_run(mlflow_tracking_uri, mlflow_run_id, "validate"):
            try:
                rep = validate_new(canonical.path, report.path, resolve(preset, overrides).data,
                                   validated_dir=validated.path)
                tracking.log_metrics({f"validate/{k}": v for k, v in rep.stats.items()})
            finally:
                if os.path.isdir(report.path):
                    mlflow.log_artifacts(report.path, artifact_path="validation")
    finally:
        if os.path.exists(f"{report.path}/data_docs.html"):
            shutil.copyfile(f"{report.path}/data_docs.html", data_docs.path)


@dsl.component(base_image=component_image(), install_kfp_package=False)
def refresh_index(canonical: Input[Dataset], preset: str, overrides: list, model_alias: str,
                  mlflow_tracking_uri: str, mlflow_run_id: str, index: Output[Artifact]) -> str:
    """Embed the notes the champion's index lacks with the champion
    (``models:/<model_name>@<model_alias>``), add them to a copy of its index, log that as this
    run's ``index`` artifact and point the version's ``index_uri`` tag at it (compare-and-set
    under the registry lease). Returns "published" or "unchanged" (nothing new)."""
    from components.common import logs, tracking
    from components.common.config import resolve
    from components.refresh.run import run

    logs.setup()
    with tracking.step_run(mlflow_tracking_uri, mlflow_run_id, "refresh"):
        record = run(canonical.path, index.path, resolve(preset, overrides),
                     tracking_uri=mlflow_tracking_uri, run_id=mlflow_run_id, alias=model_alias)
        tracking.log_numbers({k: v for k, v in record.items() if k != "added_ids"}, "refresh/")
    index.metadata.update({k: record[k] for k in (
        "status", "model_version", "index_uri", "base_index_uri", "added", "skipped_existing",
        "ntotal_after") if k in record})
    return record["status"]
