from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.common.image import component_image


@dsl.component(base_image=component_image(), install_kfp_package=False)
def train(canonical: Input[Dataset], preset: str, overrides: list, mlflow_tracking_uri: str,
          mlflow_run_id: str, model: Output[Model]):
    """Contrastive NoteLLM-2 training on the training pairs; exports the model."""
    from components.common import logs
    from components.common.config import resolve
    from components.train.run import run

    logs.setup()
    final = run(canonical.path, model.path, resolve(preset, overrides),
                tracking_uri=mlflow_tracking_uri, run_id=mlflow_run_id)
    model.metadata.update({k: round(v, 5) for k, v in final.items()})
