"""The compute dtype: decided here and nowhere else.

Checkpoints arrive in whatever dtype they were stored in (most modern LLMs in bfloat16, vision
towers often in float32, some in float16), and transformers 5 loads weights in that stored dtype.
The parts NoteLLM-2 adds (connector, fusion gate, head, temperature) are created by us. Mixing
the two fails at the first matmul on a CPU (no autocast there), so every part of the network is
built in, or cast to, one compute dtype chosen by :func:`compute_dtype`:

- ``fp32``: float32 everywhere (CPU training and inference: bf16 matmuls on CPUs are slow and
  lose precision in the optimizer's updates);
- ``bf16``: bfloat16 everywhere (GPU training: DeepSpeed keeps fp32 master weights beside them);
- ``auto``: bf16 on a CUDA device that supports it, else fp32.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def compute_dtype(device: str | torch.device = "cpu", precision: str = "auto") -> torch.dtype:
    """The dtype every parameter of the network is held in on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    on_gpu = str(device).startswith("cuda")
    return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype).removeprefix("torch."))
