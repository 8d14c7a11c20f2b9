"""Recall@K by the reference protocol, computed exactly without sorting the candidate pool.

The rank of a query's partner is the number of candidates that score higher; ties with the
partner are counted against it (pessimistic), so a model that maps everything to one point gets
R@K = 0, not a lucky ordering.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def dedupe_pairs(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Walk the pairs in order; keep one only if neither note was used by a kept pair before."""
    used: set[str] = set()
    kept = []
    for q, t in pairs:
        if q == t or q in used or t in used:
            continue
        used.update((q, t))
        kept.append((q, t))
    return kept


def partner_ranks(queries: np.ndarray, pool: np.ndarray, target: np.ndarray,
                  exclude: np.ndarray | None = None, chunk: int = 1024) -> np.ndarray:
    """0-based rank of ``pool[target[i]]`` for ``queries[i]`` among all of ``pool``.

    queries (n, d), pool (m, d), target (n,) indices into pool; exclude (n,) a pool index to leave
    out per query (the query itself when it is in the pool) or -1. Memory is O(chunk * m).

    A non-finite score never helps the partner: a partner scored NaN or ±inf is a miss (rank m),
    and a competitor scored so counts as ahead of it, as ties do.
    """
    n = len(queries)
    ranks = np.empty(n, dtype=np.int64)
    exclude = np.full(n, -1) if exclude is None else exclude
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        with np.errstate(invalid="ignore"):
            scores = queries[s:e] @ pool.T  # (c, m)
        rows = np.arange(e - s)
        t_score = scores[rows, target[s:e]].copy()  # (c,)
        t_ok = np.isfinite(t_score)
        scores[~np.isfinite(scores)] = np.inf  # a broken competitor is ahead, never behind
        ex = exclude[s:e]
        has_ex = ex >= 0
        scores[rows[has_ex], ex[has_ex]] = -np.inf
        # ties count against the partner; the partner itself is not a competitor
        ahead = (scores >= t_score[:, None]).sum(axis=1) - 1
        ranks[s:e] = np.where(t_ok, ahead, pool.shape[0])
    return ranks


def recall_at_k(ranks: np.ndarray, ks: Sequence[int], pool_size: int) -> dict[str, float]:
    """``R@K`` for each K below the pool size."""
    return {f"R@{k}": float(np.mean(ranks < k)) if len(ranks) else 0.0
            for k in ks if k < pool_size}


def evaluate_pairs(pairs: list[tuple[str, str]], pool_ids: Sequence[str], pool: np.ndarray,
                   query_vecs: np.ndarray, ks: Sequence[int], chunk: int = 1024,
                   ranks_out: list | None = None, pairs_out: list | None = None
                   ) -> tuple[dict[str, float], int]:
    """Recall@K of already de-duplicated ``pairs`` over a fixed pool. Pairs whose target is not
    in the pool are left out; returns (metrics, number of queries used). ``ranks_out`` receives
    the per-query ranks, in pair order (for paired comparisons), ``pairs_out`` the pairs they
    belong to."""
    pos = {nid: i for i, nid in enumerate(pool_ids)}
    kept = [(i, q, t) for i, (q, t) in enumerate(pairs) if t in pos]
    if not kept:
        return {}, 0
    rows = np.array([i for i, _, _ in kept])
    target = np.array([pos[t] for _, _, t in kept])
    exclude = np.array([pos.get(q, -1) for _, q, _ in kept])
    ranks = partner_ranks(query_vecs[rows], pool, target, exclude, chunk)
    if ranks_out is not None:
        ranks_out.append(ranks)
    if pairs_out is not None:
        pairs_out.append([(q, t) for _, q, t in kept])
    return recall_at_k(ranks, ks, len(pool_ids)), len(kept)
