"""The DeepSpeed JSON config, generated from the typed :class:`TrainConfig` in one place.

Nothing here is hand-written JSON: batch sizes, accumulation, clipping, precision and ZeRO follow
the run's config, so the file next to the model says exactly what the engine ran with.
The optimizer and scheduler are not in it: the worker hands DeepSpeed a ``torch.optim.AdamW``
(DeepSpeed's own Adam JIT-compiles a C++ op, minutes on a CPU machine) and a ``LambdaLR``.
"""

from __future__ import annotations

import torch

from components.common.config import TrainConfig
from model.precision import compute_dtype


def train_dtype(t: TrainConfig, device: str) -> torch.dtype:
    """The dtype the model is built and trained in (:func:`model.precision.compute_dtype`):
    bf16 on GPUs that support it (``auto``), fp32 on CPU; ``bf16``/``fp32`` force it."""
    if t.precision == "bf16" and not device.startswith("cuda"):
        raise ValueError("train.precision=bf16 needs a GPU; CPU processes train in fp32")
    return compute_dtype(device, t.precision)


def use_bf16(t: TrainConfig, device: str) -> bool:
    return train_dtype(t, device) == torch.bfloat16


def zero_stage(t: TrainConfig, world: int) -> int:
    """The ZeRO stage the engine runs: ``train.zero_stage``, except that one process without
    offload has nothing to partition, and stage 0 does the same work without ZeRO's flat-buffer
    copies (10-20 % faster per step on the tiny preset)."""
    return t.zero_stage if world > 1 or t.offload else 0


def stage3_sizes(hidden: int, on_gpu: bool) -> dict:
    """ZeRO-3's buffer sizes for a decoder of width ``hidden``, in elements.

    DeepSpeed's defaults are absolute (a 5e7-element reduce bucket, up to 1e9 parameters kept
    gathered), sized for multi-billion-parameter models: below that they hold the whole model
    gathered from the forward until the backward, which is what stage 3 exists to avoid. The
    buckets follow the width instead (transformers' ``auto`` values: ``hidden^2`` to reduce,
    ``0.9 hidden^2`` to prefetch, parameters under ``10 hidden`` kept whole). On CPU, where the
    "device" is the host memory the partitioning saves, a gathered parameter is released as soon
    as its module is done (reuse distance and live parameters of about one decoder layer,
    ``12 hidden^2``); on GPUs DeepSpeed's defaults keep the speed they were tuned for."""
    h2 = hidden * hidden
    sizes = {"reduce_bucket_size": h2, "stage3_prefetch_bucket_size": int(0.9 * h2),
             "stage3_param_persistence_threshold": 10 * hidden}
    if not on_gpu:
        sizes |= {"stage3_max_live_parameters": 12 * h2, "stage3_max_reuse_distance": 12 * h2}
    return sizes


def deepspeed_config(t: TrainConfig, *, micro_batch: int, world: int, device: str,
                     hidden: int = 4096) -> dict:
    """DeepSpeed config for ``world`` processes of ``micro_batch`` pairs each, training a model
    whose LLM is ``hidden`` wide (it sizes ZeRO-3's buffers)."""
    on_gpu = device.startswith("cuda")
    stage = zero_stage(t, world)
    zero: dict = {"stage": stage}
    if stage > 0:
        zero |= {"contiguous_gradients": True, "overlap_comm": on_gpu,
                 "reduce_bucket_size": 5e7}
    if stage == 3:
        zero |= stage3_sizes(hidden, on_gpu)
        # the worker consolidates the shards itself at export (GatheredParameters)
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if t.offload:
        if stage == 0:
            raise ValueError("train.offload needs train.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": micro_batch * t.grad_accum * world,
        "bf16": {"enabled": use_bf16(t, device)},
        "zero_optimization": zero,
        # a torch.optim optimizer, also under offload (see the module docstring)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the worker logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if t.grad_clip > 0:
        config["gradient_clipping"] = t.grad_clip
    return config
