from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from components.common.image import component_image


@dsl.component(base_image=component_image(), install_kfp_package=False)
def register(model: Input[Model], evaluation: Input[Artifact], index: Input[Artifact], preset: str,
             overrides: list, mlflow_tracking_uri: str, mlflow_run_id: str) -> str:
    """Log the servable model and evaluation to MLflow, register a version, alias challenger.
    Returns the ``models:/name@alias`` URI."""
    from components.common import logs
    from components.common.config import resolve
    from components.common.image import package_version
    from components.register.run import run

    logs.setup()
    out = run(model.path, evaluation.path, index.path, resolve(preset, overrides).register,
              tracking_uri=mlflow_tracking_uri, run_id=mlflow_run_id,
              package_version=package_version())
    return out["model_uri"]
