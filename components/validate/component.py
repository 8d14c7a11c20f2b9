from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Output

from components.common.image import component_image


@dsl.component(base_image=component_image(), install_kfp_package=False)
def validate(canonical: Input[Dataset], preset: str, overrides: list, mlflow_tracking_uri: str,
             mlflow_run_id: str, report: Output[Artifact], summary: Output[Markdown],
             data_docs: Output[HTML], validated: Output[Dataset],
             ) -> NamedTuple("Verdict", [("verdict", str), ("errors", str)]):  # noqa: UP014
    """Run the Great Expectations suites on notes, pairs, images and events before training.
    Succeeds with a verdict either way, so its reports reach the UI (KFP uploads no outputs of a
    failed task): ``verdict`` "passed" or "failed", ``errors`` the failure naming expectation,
    observed value, file, row and field; the ``validate_gate`` task after it fails the run.
    ``data_docs``: the results as one HTML page; ``report``: all files; ``validated``: the data
    the later steps use (notes dropped within tolerance removed; only a marker when failed)."""
    import os
    import shutil
    from collections import namedtuple

    from components.common import logs, tracking
    from components.common.config import resolve
    from components.validate.run import failure_message, run

    logs.setup()
    rep = None
    try:
        with tracking.step_run(mlflow_tracking_uri, mlflow_run_id, "validate") as step:
            try:
                rep = run(canonical.path, report.path, resolve(preset, overrides).data,
                          validated_dir=validated.path, raise_on_failure=False)
                tracking.log_metrics({f"validate/{k}": v for k, v in rep.stats.items()})
                tracking.log_metrics({"validate/passed": float(rep.success)})
            finally:  # the failed expectations are what a reader of a FAILED run wants
                if os.path.isdir(report.path):
                    import mlflow

                    mlflow.log_artifacts(report.path, artifact_path="validation")
        if not rep.success:  # the step's MLflow run shows the refusal, as the KFP run does
            import mlflow

            mlflow.MlflowClient().set_terminated(step.info.run_id, "FAILED")
    finally:
        # a crash before the report exists must surface as itself, not as a missing file
        for name, out in (("summary.md", summary), ("data_docs.html", data_docs)):
            if os.path.exists(f"{report.path}/{name}"):
                shutil.copyfile(f"{report.path}/{name}", out.path)
    if not rep.success:  # every declared output must exist for KFP to upload it
        os.makedirs(validated.path, exist_ok=True)
        with open(os.path.join(validated.path, "VALIDATION_FAILED"), "w") as f:
            f.write(failure_message(rep) + "\n")
    verdict = namedtuple("Verdict", ["verdict", "errors"])
    return verdict("passed", "") if rep.success else verdict("failed", failure_message(rep))


@dsl.component(base_image=component_image(), install_kfp_package=False)
def validate_gate(verdict: str, errors: str):
    """Stops the run when validation failed, raising the validate task's error (nothing after
    it runs, nothing is registered); passes otherwise."""
    if verdict != "passed":
        from components.common.schema import DataError

        raise DataError(errors or f"data validation failed (verdict {verdict!r})")
