from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.common.image import component_image


@dsl.component(base_image=component_image(), install_kfp_package=False)
def index(embeddings: Input[Dataset], preset: str, overrides: list, mlflow_tracking_uri: str,
          mlflow_run_id: str, index: Output[Artifact]):
    """FAISS index over the note vectors with its id map and a recall check vs exact search."""
    import mlflow

    from components.common import logs, tracking
    from components.common.config import resolve
    from components.index.run import run

    logs.setup()
    with tracking.step_run(mlflow_tracking_uri, mlflow_run_id, "index"):
        meta = run(embeddings.path, index.path, resolve(preset, overrides).index)
        mlflow.log_params({"index.factory": meta["factory"],
                           "index.search_params": str(meta.get("search_params", {}))})
        tracking.log_numbers(meta, "index/")
        tracking.log_numbers(meta.get("chosen", {}), "index/chosen/")  # sample, speed vs exact
        mlflow.log_dict(meta, "index/index.json")
    index.metadata.update(meta)
