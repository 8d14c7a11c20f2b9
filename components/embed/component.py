from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.common.image import component_image


@dsl.component(base_image=component_image(), install_kfp_package=False)
def embed(canonical: Input[Dataset], model: Input[Model], preset: str, overrides: list,
          embeddings: Output[Dataset]):
    """Note vectors (Parquet + float32 matrix) and modality-probe vectors of the test notes."""
    from components.common import logs
    from components.common.config import resolve
    from components.embed.run import run

    logs.setup()
    cfg = resolve(preset, overrides)
    embeddings.metadata.update(run(canonical.path, model.path, embeddings.path, cfg,
                                   probes=cfg.eval.probes))
