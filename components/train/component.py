from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.common.image import component_image


@dsl.component(base_image=component_image(), install_kfp_package=False)
def train(canonical: Input[Dataset], preset: str, overrides: list, mlflow_tracking_uri: str,
          mlflow_run_id: str, model: Output[Model], metrics: Output[Metrics]):
    """Contrastive NoteLLM-2 training on the training pairs; exports the model. ``metrics``
    (the KFP UI's scalar metrics): final loss, L_m, L_v, validation loss, temperature, pairs/s,
    tokens/s, steps, peak memory."""
    from components.common import logs
    from components.common.config import resolve
    from components.train.run import kfp_metrics, run

    logs.setup()
    final = run(canonical.path, model.path, resolve(preset, overrides),
                tracking_uri=mlflow_tracking_uri, run_id=mlflow_run_id)
    model.metadata.update({k: round(v, 5) for k, v in final.items()})
    for key, value in kfp_metrics(final).items():
        metrics.log_metric(key, value)
