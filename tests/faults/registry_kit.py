"""Versions registered through the real ``register`` step from made-up evaluations: the registry
faults concern what happens around the gate, not the model, so each version carries a small
model folder and an evaluation whose per-query ranks say which of 60 test queries it hits."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd

from components.common import tracking
from components.common.config import RegisterConfig
from components.common.readers import write_table
from components.evaluate.compare import compare_ranks
from components.evaluate.run import QUERY_RANKS
from components.register import run as register

QUERIES, POOL = 60, 500
CFG = RegisterConfig(min_eval_queries=50)


def ranks_for(hits: int) -> np.ndarray:
    """Rank 0 for the first ``hits`` queries, a miss (rank 400) for the rest."""
    return np.where(np.arange(QUERIES) < hits, 0, 400)


def evaluation(folder: str, hits: int, champion: tuple[str, int] | None = None) -> str:
    """An evaluation folder as the evaluate step writes it (metrics.json, query_ranks.parquet),
    compared with ``champion`` = (version, its hits) on the same queries when given."""
    os.makedirs(folder, exist_ok=True)
    mine = ranks_for(hits)
    metrics = {"status": "complete", "n_queries": QUERIES, "pool_size": POOL,
               "R@10": float(np.mean(mine < 10)), "R@100": float(np.mean(mine < 100))}
    if champion:
        metrics |= compare_ranks({"": mine}, {"": ranks_for(champion[1])}, [10, 100], POOL)
        metrics["champion_version"] = champion[0]
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    write_table(pd.DataFrame({"set": "", "query_id": [f"q{i}" for i in range(QUERIES)],
                              "target_id": [f"t{i}" for i in range(QUERIES)], "rank": mine}),
                os.path.join(folder, QUERY_RANKS))
    return folder


def model_and_index(folder: str) -> tuple[str, str]:
    model, index = os.path.join(folder, "model"), os.path.join(folder, "index")
    os.makedirs(model, exist_ok=True)
    os.makedirs(index, exist_ok=True)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump({"model": {"embed_dim": 8}}, f)
    with open(os.path.join(index, "index.json"), "w") as f:
        json.dump({"factory": "Flat"}, f)
    return model, index


def pipeline_run(uri: str, name: str) -> str:
    return tracking.create_run(uri, "faults", name, {"kfp_run_id": name})


def register_version(uri: str, folder: str, hits: int, champion: tuple[str, int] | None = None,
                     run_id: str = "", cfg: RegisterConfig = CFG) -> tuple[str, dict]:
    """(pipeline run id, register's result) for a new version hitting ``hits`` queries."""
    run_id = run_id or pipeline_run(uri, os.path.basename(folder))
    model, index = model_and_index(folder)
    ev = evaluation(os.path.join(folder, "evaluation"), hits, champion)
    out = register.run(model, ev, index, cfg, tracking_uri=uri, run_id=run_id,
                       package_version="0.0.0", decision_dir=os.path.join(folder, "decision"),
                       check_serving=False)  # stub model folders: nothing to load
    return run_id, out


def race(uri: str, folder: str, hits: int, champion: tuple[str, int], start, results) -> None:
    """One pipeline run's tail in its own process: register, then promote with the pipeline's
    compare-and-set, after every racer is ready (``start``, a multiprocessing barrier)."""
    import mlflow

    from components.register.promote import promote_checked

    run_id = pipeline_run(uri, os.path.basename(folder))
    model_and_index(folder)
    start.wait(timeout=120)
    _, out = register_version(uri, folder, hits, champion, run_id=run_id)
    moved = promote_checked(mlflow.MlflowClient(uri), CFG.model_name, out["version"],
                            champion[0], CFG) if out["decision"] == "promote" else {}
    results.put((hits, out["version"], out["decision"], moved.get("promoted")))
