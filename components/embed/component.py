from typing import List  # noqa: UP035 - KFP resolves typing.List annotations

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.common.image import component_image


@dsl.component(base_image=component_image(), install_kfp_package=False)
def shard_plan(preset: str, overrides: list) -> List[int]:  # noqa: UP006
    """The shard indexes the embed fan-out runs over: ``range(embed.num_shards)``."""
    from components.common.config import resolve

    return list(range(resolve(preset, overrides).embed.num_shards))


@dsl.component(base_image=component_image(), install_kfp_package=False)
def embed(canonical: Input[Dataset], model: Input[Model], preset: str, overrides: list,
          shard_index: int, embeddings: Output[Dataset]):
    """Vectors (Parquet + float32 matrix) of one shard of the notes, and modality-probe vectors
    of its test notes."""
    from components.common import logs
    from components.common.config import resolve
    from components.embed.run import run

    logs.setup()
    cfg = resolve(preset, overrides)
    embeddings.metadata.update(run(canonical.path, model.path, embeddings.path, cfg,
                                   probes=cfg.eval.probes, shard_index=shard_index,
                                   num_shards=cfg.embed.num_shards))


@dsl.component(base_image=component_image(), install_kfp_package=False)
def merge_embeddings(shards: Input[List[Dataset]], embeddings: Output[Dataset]):  # noqa: UP006
    """Concatenate the embed shards in shard order (refuses missing or overlapping shards)."""
    from components.common import logs
    from components.embed.run import merge

    logs.setup()
    embeddings.metadata.update(merge([s.path for s in shards], embeddings.path))
