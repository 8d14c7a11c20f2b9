"""train: contrastive training of NoteLLM-2 on note pairs, export in ``save_pretrained`` format.

A DeepSpeed engine on ``train.nproc`` processes (``worker.py``; torchrun starts them when there
are several, see ``launch.py``), ZeRO stage and offload from the config (``ds_config.py``),
checkpoints that a restarted task resumes from (``checkpoint.py``). Rank 0 logs loss, L_m, L_v,
temperature, learning rate, pairs/s and tokens/s to the pipeline's MLflow run, a validation loss
on held-out pairs, the DeepSpeed config and a loss-curve picture.
"""

from __future__ import annotations

import dataclasses
import math

from components.common.config import RunConfig
from components.train import launch
from components.train.data import PairBatches, PixelCache, make_collate, training_pairs
from components.train.worker import (
    CheckpointMismatch,
    CheckpointUnreadable,
    Job,
    NonFiniteGradient,
    NonFiniteLoss,
    lr_lambda,
    param_groups,
)

__all__ = ["CheckpointMismatch", "CheckpointUnreadable", "NonFiniteGradient", "NonFiniteLoss",
           "PairBatches", "PixelCache", "kfp_metrics", "lr_lambda", "make_collate",
           "param_groups", "run", "training_pairs"]


def run(canonical_dir: str, model_out: str, cfg: RunConfig, *, tracking_uri: str = "",
        run_id: str = "", progress: bool = True) -> dict[str, float]:
    """Train on ``canonical_dir``'s pairs, export to ``model_out``; returns the final metrics.

    Checkpoints go to ``train.checkpoint_dir`` (default ``<parent of model_out>/checkpoints``);
    when that folder already holds a complete checkpoint of the same configuration, training
    continues from it."""
    t = cfg.train
    if t.launcher == "trainjob":  # processes in a Kubeflow Trainer TrainJob, not in this pod
        from components.train import trainjob

        return trainjob.run(canonical_dir, model_out, cfg, tracking_uri=tracking_uri,
                            run_id=run_id)
    nproc = launch.resolve_nproc(t)
    job = Job(canonical_dir, model_out, cfg.to_dict(), tracking_uri, run_id, progress)
    if nproc == 1:
        # one process needs no launcher: the same engine, in this process
        return launch.in_process(dataclasses.replace(job, threads=t.threads_per_proc))
    return launch.torchrun(job, nproc, launch.threads_per_proc(t, nproc))


def kfp_metrics(final: dict[str, float]) -> dict[str, float]:
    """The final metrics as the train task's KFP ``Metrics`` (shown in the run's UI): every
    finite number, names as MLflow logs them (``loss``, ``pairs_per_s``, ``val/loss``, …),
    with ``steps`` for the exported step."""
    out = {k: round(float(v), 6) for k, v in sorted(final.items())
           if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if "exported_step" in out:
        out["steps"] = out["exported_step"]
    return out
