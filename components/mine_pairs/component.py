from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.common.image import component_image


@dsl.component(base_image=component_image(), install_kfp_package=False)
def mine_pairs(canonical: Input[Dataset], preset: str, overrides: list, mlflow_tracking_uri: str,
               mlflow_run_id: str, mined: Output[Dataset], report: Output[Artifact]) -> str:
    """Training pairs from view→click co-occurrence in the events, split without leakage
    (passes the data through when it has no events); returns "mined" or "skipped"."""
    import mlflow

    from components.common import logs, tracking
    from components.common.config import resolve
    from components.mine_pairs.run import step

    logs.setup()
    with tracking.step_run(mlflow_tracking_uri, mlflow_run_id, "mine_pairs"):
        done = step(canonical.path, mined.path, report.path, resolve(preset, overrides).mine)
        mlflow.log_dict(done, "mine_pairs/mining.json")
        if done["status"] == "mined":
            split = done["split"]
            mlflow.log_params({"mine.split.method": split["method"],
                               "mine.split.cutoff": str(split["cutoff"]),
                               "mine.engine": done["engine"]["name"]})
            tracking.log_metrics({f"mine/pairs_{k}": v for k, v in done["pairs"].items()}
                                 | {f"mine/removed_{k}": v for k, v in split["removed"].items()})
    mined.metadata.update({"mining": done["status"]})
    return done["status"]
