"""Symmetric in-batch InfoNCE with cross-rank negatives.

``scale = exp(log_scale) = 1 / temperature``. The 2N notes of N pairs are laid out as
``[a_1..a_N, b_1..b_N]``; each note's positive is its partner, every other note of every rank is a
negative, and the note itself is masked. Embeddings are gathered from all ranks without gradient,
then the local slice is put back with its gradient, so each rank back-propagates through its own
notes and the negatives grow with the world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

MAX_LOG_SCALE = 4.6052  # scale at most 100


def gather_with_local_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather ``x`` (n, ...) across ranks; returns (world*n, ...) and this rank's offset."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x  # keep the gradient of the local slice
    return torch.cat(parts, dim=0), rank * x.shape[0]


def info_nce(a: torch.Tensor, b: torch.Tensor, log_scale: torch.Tensor,
             keys: torch.Tensor | None = None, gather: bool = True) -> torch.Tensor:
    """Loss over pairs (a_i, b_i). a, b: (N, d) L2-normalised. keys: (2N,) note ids as int64;
    a negative that is the same note as the anchor (a note in two pairs of a batch) is masked."""
    local = torch.cat([a, b], dim=0)  # (2N, d)
    n2 = local.shape[0]
    everyone, offset = gather_with_local_grad(local) if gather else (local, 0)  # (W*2N, d)
    scale = log_scale.clamp(max=MAX_LOG_SCALE).exp()
    logits = scale * local @ everyone.T  # (2N, W*2N)
    rows = torch.arange(n2, device=local.device)
    self_col = offset + rows
    target = offset + (rows + n2 // 2) % n2
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[rows, self_col] = True
    if keys is not None:
        all_keys, _ = gather_with_local_grad(keys) if gather else (keys, 0)
        same = keys[:, None] == all_keys[None, :]  # (2N, W*2N)
        same[rows, target] = False
        mask |= same
    logits = logits.masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, target)


def notellm2_loss(out: dict, log_scale: torch.Tensor, w_m: float, w_v: float,
                  keys: torch.Tensor | None = None, gather: bool = True) -> dict[str, torch.Tensor]:
    """``L = (w_m·L_m + w_v·L_v) / (w_m + w_v)``; plain ``L_m`` when there is no ``n_v``."""
    n = out["n_m"].shape[0] // 2
    l_m = info_nce(out["n_m"][:n], out["n_m"][n:], log_scale, keys, gather)
    if out.get("n_v") is None:
        return {"loss": l_m, "loss_m": l_m}
    l_v = info_nce(out["n_v"][:n], out["n_v"][n:], log_scale, keys, gather)
    return {"loss": (w_m * l_m + w_v * l_v) / (w_m + w_v), "loss_m": l_m, "loss_v": l_v}
