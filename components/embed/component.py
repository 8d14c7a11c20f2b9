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
def merge_embeddings(shards: Input[List[Dataset]], mlflow_tracking_uri: str,  # noqa: UP006
                     mlflow_run_id: str, embeddings: Output[Dataset]):
    """Concatenate the embed shards in shard order (refuses missing or overlapping shards);
    the ``embed`` step's MLflow run gets the counts and each shard's speed."""
    import json

    from components.common import logs, tracking
    from components.embed.run import merge

    logs.setup()
    with tracking.step_run(mlflow_tracking_uri, mlflow_run_id, "embed"):
        embeddings.metadata.update(merge([s.path for s in shards], embeddings.path))
        with open(f"{embeddings.path}/embed.json") as f:
            record = json.load(f)
        tracking.log_numbers(record, "embed/")
        for i, speed in enumerate(record.get("notes_per_s_per_shard", [])):
            tracking.log_metrics({"embed/notes_per_s": speed}, step=i)
