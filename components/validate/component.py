from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Output

from components.common.image import component_image


@dsl.component(base_image=component_image(), install_kfp_package=False)
def validate(canonical: Input[Dataset], preset: str, overrides: list, mlflow_tracking_uri: str,
             mlflow_run_id: str, report: Output[Artifact], summary: Output[Markdown],
             data_docs: Output[HTML], validated: Output[Dataset]):
    """Run the Great Expectations suites on notes, pairs, images and events before training;
    fails (and stops the pipeline) with an error naming expectation, observed value, file, row
    and field. ``data_docs``: the results as one HTML page; ``report``: all files;
    ``validated``: the data the later steps use (notes dropped within tolerance removed)."""
    import os
    import shutil

    from components.common import logs, tracking
    from components.common.config import resolve
    from components.validate.run import run

    logs.setup()
    try:
        with tracking.step_run(mlflow_tracking_uri, mlflow_run_id, "validate"):
            try:
                rep = run(canonical.path, report.path, resolve(preset, overrides).data,
                          validated_dir=validated.path)
                tracking.log_metrics({f"validate/{k}": v for k, v in rep.stats.items()})
            finally:  # the failed expectations are what a reader of a FAILED run wants
                if os.path.isdir(report.path):
                    import mlflow

                    mlflow.log_artifacts(report.path, artifact_path="validation")
    finally:
        # a crash before the report exists must surface as itself, not as a missing file
        for name, out in (("summary.md", summary), ("data_docs.html", data_docs)):
            if os.path.exists(f"{report.path}/{name}"):
                shutil.copyfile(f"{report.path}/{name}", out.path)
