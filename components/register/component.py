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
    previous_champion) with a compare-and-set: if another run moved the champion since the
    decision, the version is decided again against the new champion and held unless it wins
    (the reason in its ``promotion_refused`` tag). Safe to retry. The ``promote`` step run
    records both versions. Returns "promoted" or "held"."""
    import json

    import mlflow

    from components.common import logs, tracking
    from components.common.config import resolve
    from components.register.promote import promote_checked

    logs.setup()
    cfg = resolve(preset, overrides)
    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(mlflow_tracking_uri))
    with open(f"{decision.path}/decision.json") as f:
        made = json.load(f)
    name, version = cfg.register.model_name, made["version"]
    with tracking.step_run(mlflow_tracking_uri, mlflow_run_id, "promote"):
        out = promote_checked(client, name, version, made.get("champion_version", ""),
                              cfg.register, cfg.eval)
        mlflow.set_tags({"model_name": name, "model_version": version,
                         "champion": out["champion"] or "-",
                         "previous_champion": out["previous_champion"] or "-",
                         "promoted": str(out["promoted"]).lower()})
        if out["reasons"]:
            mlflow.log_text("\n".join(out["reasons"]), "decision/promotion.md")
    return "promoted" if out["promoted"] else "held"
