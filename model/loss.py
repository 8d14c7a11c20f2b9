"""Symmetric in-batch InfoNCE with cross-rank negatives.

``scale = exp(log_scale) = 1 / temperature``. The 2N notes of N pairs are laid out as
``[a_1..a_N, b_1..b_N]``; each note's positive is its partner, every other note of every rank is a
negative, and the note itself is masked.

Across ranks the embeddings are gathered with an all-gather that carries gradient
(:class:`AllGather`): rank r scores its own 2N rows against everyone's notes, and in the backward
pass the gradient every rank computed for a note — as an anchor in its owner's rows and as a
negative in every other rank's rows — is summed back to the rank that owns it. With the data
parallel engine averaging parameter gradients over ranks, the step equals the gradient of the
whole-batch loss. Gathering without gradient (or keeping only the local slice's) gets the loss
value right and the gradient wrong: a note never learns from being another rank's negative.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

MAX_LOG_SCALE = 4.6052  # scale at most 100


class AllGather(torch.autograd.Function):
    """``all_gather`` whose backward sums every rank's gradient for a slice and hands it to the
    slice's owner. Gradients are summed, not averaged: the engine averages over ranks after.

    An all-reduce then a slice, rather than a reduce-scatter, so that it runs on gloo (CPU) too.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # (world*n, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather ``x`` (n, ...) across ranks, with gradient when ``x`` has one; returns
    (world*n, ...) and this rank's offset in it."""
    if not _distributed():
        return x, 0
    offset = dist.get_rank() * x.shape[0]
    if not x.requires_grad:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0), offset
    return AllGather.apply(x), offset


def info_nce(a: torch.Tensor, b: torch.Tensor, log_scale: torch.Tensor,
             keys: torch.Tensor | None = None, gather: bool = True,
             extra: torch.Tensor | None = None) -> torch.Tensor:
    """Loss over pairs (a_i, b_i). a, b: (N, d) L2-normalised. ``extra``: (M, d) further
    negatives of every anchor (hard negatives), never anchors themselves. keys: (2N + M,) note
    ids as int64 of a, b and extra; a candidate that is the same note as the anchor (a note in
    two pairs of a batch), or as its partner in another column, is masked."""
    local = torch.cat([a, b], dim=0)  # (2N, d)
    n2 = local.shape[0]
    everyone, offset = _gather(local) if gather else (local, 0)  # (W*2N, d)
    # the anchors are read from the gathered tensor too, so that their gradient also takes the
    # all-gather's way back (summed over ranks with the negative side's, then averaged)
    anchors = everyone[offset:offset + n2]  # (2N, d)
    candidates = everyone
    if extra is not None and extra.shape[0]:
        candidates = torch.cat([everyone, _gather(extra)[0] if gather else extra])  # (W*(2N+M), d)
    scale = log_scale.clamp(max=MAX_LOG_SCALE).exp()
    logits = scale * anchors @ candidates.T  # (2N, W*2N [+ W*M])
    rows = torch.arange(n2, device=local.device)
    self_col = offset + rows
    target = offset + (rows + n2 // 2) % n2
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[rows, self_col] = True
    if keys is not None:
        if len(keys) != n2 + (0 if extra is None else extra.shape[0]):
            raise ValueError(f"{len(keys)} keys for {n2} pair notes and "
                             f"{0 if extra is None else extra.shape[0]} extra negatives")
        pair_keys, extra_keys = keys[:n2], keys[n2:]
        all_keys = _gather(pair_keys)[0] if gather else pair_keys
        if extra is not None and extra.shape[0]:
            all_keys = torch.cat([all_keys, _gather(extra_keys)[0] if gather else extra_keys])
        partner = pair_keys[(rows + n2 // 2) % n2]
        # the anchor itself, and its partner wherever else it appears, are not negatives
        same = (pair_keys[:, None] == all_keys[None, :]) | (partner[:, None] == all_keys[None, :])
        same[rows, target] = False
        mask |= same
    logits = logits.masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, target)


def notellm2_loss(out: dict, log_scale: torch.Tensor, w_m: float, w_v: float,
                  keys: torch.Tensor | None = None, gather: bool = True,
                  n_pairs: int | None = None) -> dict[str, torch.Tensor]:
    """``L = (w_m·L_m + w_v·L_v) / (w_m + w_v)``; plain ``L_m`` when there is no ``n_v``.

    The rows of ``out`` are ``[a_1..a_N, b_1..b_N]`` and, with ``n_pairs = N`` given, any
    rows after the 2N are extra negatives of every anchor (hard negatives)."""
    n = out["n_m"].shape[0] // 2 if n_pairs is None else n_pairs

    def loss(v: torch.Tensor) -> torch.Tensor:
        return info_nce(v[:n], v[n:2 * n], log_scale, keys, gather, extra=v[2 * n:])

    l_m = loss(out["n_m"])
    if out.get("n_v") is None:
        return {"loss": l_m, "loss_m": l_m}
    l_v = loss(out["n_v"])
    return {"loss": (w_m * l_m + w_v * l_v) / (w_m + w_v), "loss_m": l_m, "loss_v": l_v}
