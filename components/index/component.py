from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.common.image import component_image


@dsl.component(base_image=component_image(), install_kfp_package=False)
def index(embeddings: Input[Dataset], preset: str, overrides: list, index: Output[Artifact]):
    """FAISS index over the note vectors with its id map and a recall check vs exact search."""
    from components.common import logs
    from components.common.config import resolve
    from components.index.run import run

    logs.setup()
    index.metadata.update(run(embeddings.path, index.path, resolve(preset, overrides).index))
