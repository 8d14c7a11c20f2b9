from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Output

from components.common.image import component_image


@dsl.component(base_image=component_image(), install_kfp_package=False)
def validate(canonical: Input[Dataset], preset: str, overrides: list, mlflow_tracking_uri: str,
             mlflow_run_id: str, report: Output[Artifact], summary: Output[Markdown]):
    """Check notes, pairs and images before training; fails (and stops the pipeline) with an
    error naming file, row and field."""
    import os
    import shutil

    from components.common import logs, tracking
    from components.common.config import resolve
    from components.validate.run import run

    logs.setup()
    try:
        with tracking.pipeline_run(mlflow_tracking_uri, mlflow_run_id):
            rep = run(canonical.path, report.path, resolve(preset, overrides).data)
            tracking.log_metrics({f"validate/{k}": v for k, v in rep.stats.items()})
    finally:
        # a crash before the report exists must surface as itself, not as a missing file
        if os.path.exists(f"{report.path}/summary.md"):
            shutil.copyfile(f"{report.path}/summary.md", summary.path)
