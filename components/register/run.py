"""register: log the evaluation and the servable model to the pipeline's MLflow run, register a
model version and give it the ``challenger`` alias. Refuses an incomplete evaluation."""

from __future__ import annotations

import json
import logging
import os
import tempfile

from components.common import storage, tracking
from components.common.config import RegisterConfig

log = logging.getLogger(__name__)
SERVING = os.path.join(os.path.dirname(__file__), "serving.py")


def _signature(dim: int):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("string", "title"), ColSpec("string", "content"),
                     ColSpec("string", "topics", required=False),
                     ColSpec("string", "image_uri", required=False),
                     ColSpec("binary", "image", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.float32),
                                                                    (-1, dim))]))


def run(model_dir: str, eval_dir: str, index_dir: str, cfg: RegisterConfig, *,
        tracking_uri: str, run_id: str, package_version: str) -> dict:
    import mlflow

    metrics = json.loads(storage.read_text(storage.join(eval_dir, "metrics.json")))
    if metrics.get("status") != "complete":
        raise RuntimeError(f"evaluation status is {metrics.get('status')!r}: nothing registered")
    with storage.local_copy(model_dir) as local_model, \
            tracking.pipeline_run(tracking_uri, run_id):
        tracking.log_metrics({k: v for k, v in metrics.items() if k != "status"})
        with tempfile.TemporaryDirectory() as tmp:
            for src, name in ((eval_dir, "evaluation"), (index_dir, "index")):
                dest = os.path.join(tmp, name)
                os.makedirs(dest)
                for f in storage.list_files(src):
                    storage.write_bytes(os.path.join(dest, f),
                                        storage.read_bytes(storage.join(src, f)))
                mlflow.log_artifacts(dest, artifact_path=name)
        with open(os.path.join(local_model, "config.json")) as f:
            dim = json.load(f)["model"]["embed_dim"]
        info = mlflow.pyfunc.log_model(
            name="model", python_model=SERVING, artifacts={"model": local_model},
            signature=_signature(dim), registered_model_name=cfg.model_name,
            pip_requirements=[f"notellm2-kfp=={package_version}"],
        )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(tracking_uri))
    client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
    for key in ("R@10", "R@100", "n_queries", "pool_size"):
        if key in metrics:
            client.set_model_version_tag(cfg.model_name, version, tracking.metric_key(key),
                                         str(metrics[key]))
    client.set_model_version_tag(cfg.model_name, version, "run_id", run_id)
    log.info("registered %s version %s with alias %r", cfg.model_name, version, cfg.alias)
    return {"name": cfg.model_name, "version": version, "alias": cfg.alias,
            "model_uri": f"models:/{cfg.model_name}@{cfg.alias}"}
