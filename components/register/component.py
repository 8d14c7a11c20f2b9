from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Model, Output

from components.common.image import component_image


@dsl.component(base_image=component_image(), install_kfp_package=False)
def register(model: Input[Model], evaluation: Input[Artifact], index: Input[Artifact], preset: str,
             overrides: list, mlflow_tracking_uri: str, mlflow_run_id: str,
             decision: Output[Artifact], summary: Output[Markdown]) -> str:
    """Log the servable model and evaluation to MLflow, register a version with alias
    challenger, decide on promotion and write the A/B plan (``decision``: decision.json with
    the version, decision.md, ab_plan.json/md). Refuses an incomplete evaluation. Returns the
    gate's verdict, "promote" or "hold" (one plain output: kfp.local cannot branch on a field
    of a NamedTuple output)."""
    import shutil

    from components.common import logs
    from components.common.config import resolve
    from components.common.image import package_version
    from components.register.run import run

    logs.setup()
    out = run(model.path, evaluation.path, index.path, resolve(preset, overrides).register,
              tracking_uri=mlflow_tracking_uri, run_id=mlflow_run_id,
              package_version=package_version(), decision_dir=decision.path)
    with open(summary.path, "w") as f:
        for name in ("decision.md", "ab_plan.md"):
            with open(f"{decision.path}/{name}") as part:
                shutil.copyfileobj(part, f)
            f.write("\n")
    decision.metadata.update({"version": out["version"], "decision": out["decision"],
                              "model_uri": f"models:/{out['name']}/{out['version']}"})
    return out["decision"]


@dsl.component(base_image=component_image(), install_kfp_package=False)
def promote(decision: Input[Artifact], preset: str, overrides: list,
            mlflow_tracking_uri: str, mlflow_run_id: str) -> str:
    """Give the version the gate passed the champion alias (the old champion becomes
    previous_champion); the ``promote`` step run records both versions."""
    import json

    import mlflow

    from components.common import logs, tracking
    from components.common.config import resolve
    from components.register.promote import promote as move

    logs.setup()
    cfg = resolve(preset, overrides).register
    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(mlflow_tracking_uri))
    with open(f"{decision.path}/decision.json") as f:
        version = json.load(f)["version"]
    with tracking.step_run(mlflow_tracking_uri, mlflow_run_id, "promote"):
        aliases = move(client, cfg.model_name, version, reason="pipeline gate")
        mlflow.set_tags({"model_name": cfg.model_name, "model_version": version}
                        | {k: v or "-" for k, v in aliases.items()})
    return f"models:/{cfg.model_name}@champion"
