"""register: log the evaluation and the servable model to the pipeline's MLflow run, register a
model version and give it the ``challenger`` alias. Refuses an incomplete evaluation."""

from __future__ import annotations

import json
import logging
import os
import tempfile

from components.common import storage, tracking
from components.common.config import RegisterConfig
from components.register import packaging, promote

log = logging.getLogger(__name__)
SERVING = os.path.join(os.path.dirname(__file__), "serving.py")
RELATED = os.path.join(os.path.dirname(__file__), "related.py")


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


def _related_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    from components.register.related import DEFAULT_K

    inputs = Schema([ColSpec("string", "note_id", required=False),
                     ColSpec("string", "title", required=False),
                     ColSpec("string", "content", required=False),
                     ColSpec("string", "topics", required=False),
                     ColSpec("string", "image_uri", required=False),
                     ColSpec("binary", "image", required=False)])
    outputs = Schema([ColSpec("string", "note_id"),
                      ColSpec(Array(DataType.string), "related_ids"),
                      ColSpec(Array(DataType.double), "scores")])
    return ModelSignature(inputs=inputs, outputs=outputs,
                          params=ParamSchema([ParamSpec("k", DataType.long, DEFAULT_K)]))


def _check_encoder(out, n: int, dim: int) -> None:
    """The encoder's answer to its input example: one unit vector of the right width per note."""
    import numpy as np

    out = np.asarray(out)
    if out.shape != (n, dim) or not np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-3):
        raise RuntimeError(f"the logged model answered its input example with shape "
                           f"{out.shape}, not {n} unit vectors of {dim}: nothing registered")


def _first_note_id(index_dir: str) -> str:
    from components.common.readers import read_table

    path = os.path.join(index_dir, "ids.parquet")
    return str(read_table(path)["note_id"].iloc[0]) if os.path.exists(path) else ""


def log_related(local_model: str, local_index: str, *, check: bool = True) -> str:
    """Log the related-notes pyfunc (``related.py``: note id or fields in, top-K related note
    ids of this run's index out) as the run's model ``related``; returns its model URI."""
    note_id = _first_note_id(local_index)
    example = packaging.related_example(note_id)
    k = 3

    def check_related(out) -> None:
        ids = list(out["related_ids"])
        if len(out) != len(example) or not all(0 < len(r) <= k for r in ids) \
                or note_id in ids[0]:
            raise RuntimeError(f"the logged related-notes model answered its input example "
                               f"with {out!r}: nothing registered")

    info = packaging.log_checked(
        check_related, name="related", python_model=RELATED,
        serving_body=packaging.serving_input(example, {"k": k}) if check else None,
        artifacts={"model": local_model, "index": local_index},
        signature=_related_signature(), input_example=(example, {"k": k}) if check else None,
        pip_requirements=packaging.pinned(packaging.RELATED_REQUIREMENTS))
    return info.model_uri


def _arm(client, name: str, version: str) -> dict:
    """What the A/B plan needs of a registered version, from its tags."""
    mv = client.get_model_version(name, version)
    return {"version": str(version), "model_uri": f"models:/{name}/{version}",
            # a refreshed index (notellm2 refresh) is named by the version's index_uri tag
            "index_uri": mv.tags.get("index_uri") or f"runs:/{mv.run_id}/index",
            "dim": int(mv.tags.get("embed_dim", 0)),
            "index_params": json.loads(mv.tags.get("index_params", "{}"))}


def registered_version(client, name: str, run_id: str) -> str | None:
    """The version ``run_id`` registered already (a retried register task), or None."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    return str(min(int(v.version) for v in found)) if found else None


def run(model_dir: str, eval_dir: str, index_dir: str, cfg: RegisterConfig, *,
        tracking_uri: str, run_id: str, package_version: str, decision_dir: str = "",
        check_serving: bool = True) -> dict:
    """Register the version (alias ``challenger``), decide on promotion (tags, decision.md) and
    write the A/B plan (ab_plan.json, ab_plan.md) to ``decision_dir``. Returns name, version,
    alias, model_uri and decision ("promote" or "hold").

    Also logs the related-notes model (``related``) to the run; the version's tag
    ``related_model_uri`` names it. Each model is logged with its inference code and checked to
    answer its input example before anything is registered (``check_serving=False``, only for
    tests that register stub model folders, logs them without input example or check). ``package_version`` is kept for callers: the models
    no longer require the package, they carry its code."""
    import mlflow

    metrics = json.loads(storage.read_text(storage.join(eval_dir, "metrics.json")))
    if metrics.get("status") != "complete":
        with tracking.step_run(tracking_uri, run_id, "register"):  # a FAILED register run
            raise RuntimeError(
                f"evaluation status is {metrics.get('status')!r}: nothing registered")
    with storage.local_copy(model_dir) as local_model, \
            storage.local_copy(index_dir) as local_index, \
            tracking.pipeline_run(tracking_uri, run_id):
        with tempfile.TemporaryDirectory() as tmp:
            # the index from its local copy (downloaded once); each file streamed, not read whole
            for src, name in ((eval_dir, "evaluation"), (local_index, "index")):
                dest = os.path.join(tmp, name)
                os.makedirs(dest)
                for f in storage.list_files(src):
                    storage.copy(storage.join(src, f), os.path.join(dest, f))
                mlflow.log_artifacts(dest, artifact_path=name)
        with open(os.path.join(local_model, "config.json")) as f:
            dim = json.load(f)["model"]["embed_dim"]
        client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(tracking_uri))
        version = registered_version(client, cfg.model_name, run_id)
        if version:  # a retried task: the version of the first attempt, not a second one
            log.info("run %s already registered %s version %s: reused", run_id,
                     cfg.model_name, version)
        else:
            example = packaging.encoder_example()
            info = packaging.log_checked(
                lambda out: _check_encoder(out, len(example), dim),
                serving_body=packaging.serving_input(example) if check_serving else None,
                name="model", python_model=SERVING, artifacts={"model": local_model},
                signature=_signature(dim),
                input_example=example if check_serving else None,
                pip_requirements=packaging.pinned(packaging.ENCODER_REQUIREMENTS),
            )
            version = str(mlflow.register_model(info.model_uri, cfg.model_name).version)
        # the evaluation, linked to the logged model too (MLflow 3: its page lists them)
        source = client.get_model_version(cfg.model_name, version).source  # models:/<model id>
        model_id = source.removeprefix("models:/") if source.startswith("models:/m-") else None
        tracking.log_metrics({k: v for k, v in metrics.items() if k != "status"},
                             model_id=model_id)
        # related notes (item-to-item) of this version: logged once, also by a retried task
        related_uri = client.get_model_version(cfg.model_name, version).tags.get(
            "related_model_uri") or log_related(local_model, local_index, check=check_serving)
    index_meta = json.loads(storage.read_text(storage.join(index_dir, "index.json")))
    tags = {tracking.metric_key(k): str(metrics[k])
            for k in ("R@10", "R@100", "n_queries", "pool_size") if k in metrics}
    tags |= {"run_id": run_id, "embed_dim": str(dim), "evaluation_status": metrics["status"],
             "index_params": json.dumps({k: index_meta.get(k) for k in (
                 "factory", "search_params", "recall", "recall_k") if k in index_meta})}
    tags["related_model_uri"] = related_uri
    decision = promote.decide(metrics, cfg)
    tags |= promote.decision_tags(decision, cfg)
    # every tag before the alias: whoever follows ``challenger`` finds the decision written
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
    client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
    log.info("registered %s version %s with alias %r; gate: %s (%s)", cfg.model_name, version,
             cfg.alias, decision.verdict, "; ".join(decision.reasons))
    champion = (_arm(client, cfg.model_name, decision.champion_version)
                if decision.champion_version else None)
    plan = promote.ab_plan(metrics, decision, cfg, _arm(client, cfg.model_name, version),
                           champion)
    files = {
        "decision.md": decision.markdown(promote.rule_text(cfg)),
        "decision.json": json.dumps(
            {"name": cfg.model_name, "version": version, "decision": decision.verdict,
             "reasons": decision.reasons,
             "metric": decision.metric, "champion_version": decision.champion_version},
            indent=2),
        "ab_plan.json": json.dumps(plan, indent=2),
        "ab_plan.md": promote.ab_markdown(plan),
    }
    with tracking.step_run(tracking_uri, run_id, "register"):
        mlflow.set_tags({"model_name": cfg.model_name, "model_version": version,
                         "decision": decision.verdict})
        for name, text in files.items():
            mlflow.log_text(text, f"decision/{name}")
    if decision_dir:
        for name, text in files.items():
            storage.write_text(storage.join(decision_dir, name), text)
    return {"name": cfg.model_name, "version": version, "alias": cfg.alias,
            "model_uri": f"models:/{cfg.model_name}@{cfg.alias}", "decision": decision.verdict}
