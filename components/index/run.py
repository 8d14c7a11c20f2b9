"""index: a FAISS index over the note vectors (inner product on unit vectors), its id map, and
its recall@K measured against exact search.

Writes to the output folder

  index.faiss   a CPU index (an index built on GPUs is copied back before writing)
  ids.parquet   note_id, position: the index's ids are row positions
  index.json    factory, size, parameters, timings, bytes per vector, recall@K vs exact search

and :func:`load_index` reads them back with the recorded search parameters applied.

The factory string comes from ``IndexConfig.factory``: an explicit string is built as given.
``"auto"`` is exact ``Flat`` up to ``flat_max`` vectors; above it, on the CPU, the index is chosen
by measurement (:func:`select_factory`): each candidate of :func:`candidate_factories` (Flat,
``IVF{n},Flat`` at ½, 1 and 2× the power of two nearest 4·√N lists, ``HNSW32``, and
``IVF{n},PQ{d/2}x4fs,RFlat``, fast-scan codes with exact re-ranking of k·8 candidates) is built on
a random sample of ``select_sample`` vectors, its knob tuned to ``target_recall`` on held-out
vectors used as queries (not in the sample: fresh queries), and its recall and queries/s measured
on a second held-out set; the fastest that reaches the target wins. Flat is a candidate, so the
choice is never slower than exact search on the sample; the sample keeps IVF list sizes, so the
IVF/Flat speed ratio carries over to N roughly unchanged (both scale linearly), while HNSW's
improves with N (~log N). The winner is then built on all vectors, its knob re-tuned there, and
timed against exact search on the check queries over all vectors: slower, and Flat replaces it.
On GPUs, ``"auto"`` keeps the rule ``IVF{nlist},Flat`` (the candidates are CPU measurements; HNSW
and fast-scan have no GPU version). ``index.json`` records ``candidates`` (factory, recall,
queries/s, speed vs Flat, build seconds, bytes per vector on the sample) and ``chosen`` (factory,
reason, sample size, speed vs exact over all vectors).

The number of lists searched (``nprobe``; ``efSearch`` for HNSW) is, unless fixed in the config,
the smallest on a ladder whose recall@K vs exact search, on a sample of collection vectors used
as queries (leave-one-out), reaches ``target_recall + recall_margin``; the recall stored is then
measured on a second, disjoint sample, so it is not the number the tuning stopped at, and where
that sample is still below ``target_recall`` the knob steps up until it reaches it too
(``check_step_up``). The margin is there for queries the index has not seen: at 200k vectors,
tuned to exactly 0.95, fresh queries got 0.947. :func:`tune` finds the value by galloping from a
start (for ``"auto"``, the value chosen on the sample) and bisecting, in ~2·log2 steps rather
than one per ladder value from 1: at 1M vectors each step searches 1,000 queries, and a weakly
clustered collection needs hundreds of lists.
``tests/benchmarks/bench_index.py`` holds the measurements behind these choices.

Vectors must already be unit length (the embed step normalises them), so that inner product is
the cosine that exact search over the same embeddings uses. Vectors off by more than 1e-3 are an
error, not renormalised here: a quietly renormalised index would rank differently from exact
search over the embeddings it claims to index.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import numpy as np
import pandas as pd

from components.common import storage
from components.common.config import IndexConfig
from components.common.readers import read_table, write_table
from components.embed.run import read_vectors

log = logging.getLogger(__name__)

NORM_TOL = 1e-3
# quarter-octave steps (+19 % each): the chosen value costs at most ~19 % more than needed
LADDER = tuple(sorted({round(2 ** (j / 4)) for j in range(0, 4 * 16 + 1)}))  # 1 .. 65536
_SCORE_EPS = 1e-5  # an index's neighbour scoring within this of the K-th exact score is a hit


# -- choosing the index ---------------------------------------------------------------------

def auto_nlist(n: int) -> int:
    """Lists of the auto IVF index: the power of two nearest 4·√n, with at least 39 vectors per
    list (FAISS's k-means warns below that). At 1M clustered 64-d vectors on 2 cores, 4096
    lists searched 10.7× faster than exact search at recall@100 0.957 (build 12.5 s); 2048
    lists, 9.2× at 0.964 (build 4.3 s)."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return nlist


def resolve_factory(factory: str, n: int, flat_max: int) -> str:
    if factory.strip().lower() != "auto":
        return factory.strip()
    return "Flat" if n <= flat_max else f"IVF{auto_nlist(n)},Flat"


def train_size(cfg: IndexConfig, n: int, nlist: int) -> int:
    """Vectors to train on: ``cfg.train_sample`` or, when 0, 64 per list (at 1M vectors, 64 and
    39 per list gave the same recall; FAISS itself would subsample to 256 per list) and at least
    65536 (PQ codebooks train 256 centroids per sub-quantiser)."""
    want = cfg.train_sample or max(64 * nlist, 65_536)
    return min(n, want)


# -- devices -----------------------------------------------------------------------------------

def visible_gpus() -> int:
    """GPUs FAISS can use: 0 with faiss-cpu, which has no GPU code."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def gpus_to_use(use_gpu: str) -> int:
    if use_gpu == "never":
        return 0
    n = visible_gpus()
    if use_gpu == "always" and n == 0:
        raise RuntimeError("index.use_gpu=always but FAISS sees no GPU (faiss-cpu installed, or "
                           "no CUDA device visible); set index.use_gpu=auto to build on the CPU")
    return n


def _to_gpus(index, use_gpu: str):
    """(index on all visible GPUs as replicas, or the CPU index when it cannot go there; GPUs)."""
    import faiss

    try:
        return faiss.index_cpu_to_all_gpus(index), visible_gpus()
    except (RuntimeError, AttributeError) as e:  # e.g. HNSW has no GPU implementation
        if use_gpu == "always":
            raise RuntimeError(f"index.use_gpu=always but this index cannot go to the GPU: {e}") \
                from None
        log.warning("index stays on the CPU: FAISS cannot put it on the GPU (%s)", e)
        return index, 0


# -- checks --------------------------------------------------------------------------------

def check_vectors(ids: pd.Series, vectors: np.ndarray, expected_dim: int = 0) -> None:
    """Errors, each naming what is wrong: dimension, duplicate ids, non-finite or non-unit rows."""
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be an (N, d) matrix, got shape {vectors.shape}")
    n, d = vectors.shape
    if len(ids) != n:
        raise ValueError(f"{len(ids)} note ids for {n} vectors")
    if n == 0:
        raise ValueError("no vectors to index")
    if expected_dim and d != expected_dim:
        raise ValueError(f"dimension mismatch: the vectors are {d}-dimensional but "
                         f"index.expected_dim is {expected_dim}")
    dup = pd.unique(ids[ids.duplicated()])
    if len(dup):
        raise ValueError(f"duplicate note id(s) in the embeddings ({len(dup)}): "
                         + ", ".join(map(str, dup[:5])) + (", ..." if len(dup) > 5 else ""))
    norms = np.linalg.norm(vectors, axis=1)  # (N,)
    bad = ~(np.abs(norms - 1.0) <= NORM_TOL)  # NaN counts as bad
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{int(bad.sum())} of {n} vectors are not unit length (|norm - 1| > {NORM_TOL}), "
            f"e.g. note {ids.iloc[first]} has norm {norms[first]:.4g}; inner product is cosine "
            "only on unit vectors: normalise them in the embed step")


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores (q, k), positions (q, k); -1 where fewer than k were found). Checks the width."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(f"dimension mismatch: the queries are "
                         f"{queries.shape[-1] if queries.ndim else 0}-dimensional but the index "
                         f"holds {index.d}-dimensional vectors")
    return index.search(queries, k)


# -- recall against exact search ------------------------------------------------------------

def exact_topk(vectors: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of the collection rows ``rows`` against the whole collection."""
    import faiss

    return faiss.knn(vectors[rows], vectors, k, metric=faiss.METRIC_INNER_PRODUCT)


def recall_vs_exact(found: np.ndarray, vectors: np.ndarray, rows: np.ndarray,
                    truth_scores: np.ndarray, truth_ids: np.ndarray, k: int) -> float:
    """Leave-one-out recall@k of an index for collection rows used as queries.

    found (q, k+1) index results for ``vectors[rows]``; truth_* (q, k+1) exact results. The query
    itself is left out of both lists (it is always found, and would lift recall by ~1/k). A found
    neighbour is a hit when its exact score reaches the k-th exact score: ties between identical
    notes then do not count as misses.
    """
    q = vectors[rows]  # (q, d)
    self_early = (truth_ids[:, :k] == rows[:, None]).any(axis=1)  # (q,) self in the exact top-k
    kth = np.where(self_early, truth_scores[:, k], truth_scores[:, k - 1])  # (q,)
    hits = 0
    for i in range(len(rows)):
        f = found[i][(found[i] >= 0) & (found[i] != rows[i])][:k]  # (<=k,)
        scores = vectors[f] @ q[i]  # (<=k,)
        hits += int(np.sum(scores >= kth[i] - _SCORE_EPS))
    return hits / (k * len(rows))


class _RecallProbe:
    """Exact neighbours of sampled collection rows, computed once, to score index settings."""

    def __init__(self, vectors: np.ndarray, rows: np.ndarray, k: int):
        self.vectors, self.rows, self.k = vectors, rows, k
        self.scores, self.ids = exact_topk(vectors, rows, k + 1)

    def recall(self, index) -> float:
        _, found = search(index, self.vectors[self.rows], self.k + 1)
        return recall_vs_exact(found, self.vectors, self.rows, self.scores, self.ids, self.k)


def _search_knob(cpu_index) -> tuple[str | None, dict]:
    """(the search-time parameter that trades speed for recall, the build parameters)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(cpu_index)
    if ivf is not None:
        return "nprobe", {"nlist": int(ivf.nlist)}
    inner = faiss.downcast_index(cpu_index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch", {"M": int(inner.hnsw.nb_neighbors(1)),
                            "efConstruction": int(inner.hnsw.efConstruction)}
    return None, {}


def set_search_params(index, params: dict) -> None:
    import faiss

    space = faiss.ParameterSpace()
    if "Gpu" in type(index).__name__ or isinstance(index, faiss.IndexReplicas):
        space = faiss.GpuParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def tune(index, probe, knob: str, target: float, *, upper: int, lower: int = 1,
         start: int = 0, give_up_seconds: float = math.inf) -> tuple[int, list[dict], bool]:
    """(the smallest ``knob`` value on :data:`LADDER` within [lower, upper] (upper always a
    candidate) whose ``probe`` recall reaches ``target``, the recall of each value tried in
    increasing order, whether it was reached).

    Recall grows with the knob (an IVF searching more lists finds a superset), so the value is
    found by galloping from ``start`` (the nearest ladder value; ``lower`` when 0) in doubling
    ladder steps, up until the target is reached or down until it is not, then bisecting the
    last gap: about 2·log2 of the ladder distance searches instead of one per ladder value from
    ``lower``, and the largest value searched is at most ~2× the answer past ``start``. Going
    up stops, not reached, once a search that misses the target takes longer than
    ``give_up_seconds`` (every larger value is slower still)."""
    values = sorted({lower, upper, *(v for v in LADDER if lower < v < upper)})
    tried: dict[int, float] = {}

    def reaches(i: int) -> bool:
        if i not in tried:
            set_search_params(index, {knob: values[i]})
            tried[i] = probe.recall(index)
        return tried[i] >= target

    def curve() -> list[dict]:
        return [{knob: values[i], "recall": round(tried[i], 5)} for i in sorted(tried)]

    i = int(np.searchsorted(values, start)) if start else 0
    i = min(i, len(values) - 1)
    step = 1
    if reaches(i):  # gallop down to a value that misses, or to `lower`
        hi, lo = i, -1
        while hi > 0:
            j = max(0, hi - step)
            if reaches(j):
                hi = j
            else:
                lo = j
                break
            step *= 2
    else:  # gallop up to a value that reaches, or give up
        lo, hi = i, -1
        while lo < len(values) - 1:
            if getattr(probe, "seconds", 0.0) > give_up_seconds:
                break
            j = min(len(values) - 1, lo + step)
            if reaches(j):
                hi = j
                break
            lo = j
            step *= 2
        if hi < 0:
            log.info("recall target %.3f not reached: %s=%d gives %.4f", target, knob,
                     values[lo], tried[lo])
            return values[lo], curve(), False
    while hi - lo > 1:  # bisect: values[lo] misses (or lo = -1), values[hi] reaches
        m = (lo + hi) // 2
        if reaches(m):
            hi = m
        else:
            lo = m
    return values[hi], curve(), True


# -- building ----------------------------------------------------------------------------------

def _train(cpu, vectors: np.ndarray, size: int, ngpu: int, rng: np.random.Generator) -> None:
    """Train on ``size`` sampled rows; an IVF's k-means runs on the GPUs when there are any."""
    import faiss

    n, d = vectors.shape
    sample = vectors if size >= n else vectors[np.sort(rng.choice(n, size, replace=False))]
    ivf = faiss.try_extract_index_ivf(cpu)
    clustering = None
    if ngpu and ivf is not None:
        # L2 assignment to unit centroids is inner-product assignment for unit vectors. Held in
        # a local as well: SWIG does not keep the Python object alive.
        clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(d))
        ivf.clustering_index = clustering
    cpu.train(sample)
    if clustering is not None:
        ivf.clustering_index = None  # the GPU copies go with `clustering`


# -- choosing by measurement ------------------------------------------------------------------

K_FACTOR_RF = 8  # re-ranked candidates per result for ",RFlat" indexes: k·8 exact inner products
SELECT_REPEAT = 3  # timed searches per candidate; the fastest counts (others' load only slows)
PQ_MIN_SAMPLE = 20_000
# queries per timed search: exact search (IndexFlatIP, faiss.knn) answers a batch of 2,000 or
# more ~2.5-3x faster per query than one of 1,000 (faiss 1.15, 2 cores: 312 vs 828 queries/s at
# 200k vectors), while an IVF's cost per query barely moves. Speeds are compared in batches where
# exact search is at its fastest, held-out queries repeated to fill them, so that "never slower
# than exact search" holds for batched exact search too; at 1,000-query batches an IVF searching
# half its lists measured 1.4x exact, and 0.4x against 2,000-query batches.
SPEED_QUERIES = 2048
FULL_REPEAT = 2  # timed searches of each over all vectors (exact search: ~8 s a batch at 1M)
GIVE_UP = 1.5  # a missing tuning step this many times slower than the fastest candidate so far
# ends the candidate's tuning


def _pow2(x: float) -> int:
    return 2 ** max(0, round(math.log2(max(1.0, x))))


def candidate_factories(n: int, d: int, sample: int) -> list[tuple[str, str]]:
    """(factory over the ``sample``-vector measurement set, factory over all ``n``) pairs.

    IVF list counts are half, once and twice :func:`auto_nlist` (n); on the sample the count is
    scaled by sample/n so that lists hold as many vectors as they will in the full index, and
    the share of lists searched (nprobe/nlist), which sets both recall and the speed ratio to
    Flat, carries over. Fast-scan PQ is measured from :data:`PQ_MIN_SAMPLE` sample vectors on:
    its codebooks take seconds to train, and below that Flat or IVF,Flat win anyway."""
    out = [("Flat", "Flat")]
    base = auto_nlist(n)
    for full in sorted({max(1, base // 2), base, base * 2}):
        small = _pow2(full * sample / n)
        if n >= 39 * full and sample >= 39 * small and small > 1:
            out.append((f"IVF{small},Flat", f"IVF{full},Flat"))
    out.append(("HNSW32", "HNSW32"))
    small = _pow2(base * sample / n)
    if d % 2 == 0 and sample >= PQ_MIN_SAMPLE and small > 1:
        pq = f"PQ{d // 2}x4fs,RFlat"  # 4 bits per 2 dimensions, exact re-ranking of k·8
        out.append((f"IVF{small},{pq}", f"IVF{base},{pq}"))
    return out


def _aim(cfg: IndexConfig) -> float:
    """The recall knobs are tuned to: the target plus ``recall_margin``, so that recall on other
    queries (sampling error of ~1,000 queries, fresh queries a little harder than collection
    rows) still reaches the target."""
    return min(1.0, cfg.target_recall + cfg.recall_margin)


def _fixed_params(factory: str) -> dict:
    return {"k_factor_rf": K_FACTOR_RF} if "RFlat" in factory else {}


def _flat(vectors: np.ndarray):
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


class _HeldOutProbe:
    """Exact neighbours of held-out queries (vectors that are not in the index measured)."""

    def __init__(self, base: np.ndarray, queries: np.ndarray, k: int):
        import faiss

        self.base, self.queries, self.k = base, queries, k
        self.scores, _ = faiss.knn(queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)
        self.seconds = 0.0  # of the last search

    def recall(self, index) -> float:
        t0 = time.perf_counter()
        _, found = search(index, self.queries, self.k)
        self.seconds = time.perf_counter() - t0
        hits = 0
        for i in range(len(self.queries)):
            f = found[i][found[i] >= 0]
            hits += int(np.sum(self.base[f] @ self.queries[i] >= self.scores[i, -1] - _SCORE_EPS))
        return hits / (self.k * len(self.queries))

    def qps(self, index) -> float:
        """Queries/s, best of :data:`SELECT_REPEAT` searches of :data:`SPEED_QUERIES` queries."""
        q = _batch(self.queries)
        best = math.inf
        for _ in range(SELECT_REPEAT):
            t0 = time.perf_counter()
            search(index, q, self.k)
            best = min(best, time.perf_counter() - t0)
        return len(q) / best


def _batch(queries: np.ndarray) -> np.ndarray:
    """(SPEED_QUERIES, d): the queries, repeated in turn to fill a timing batch."""
    return np.ascontiguousarray(np.resize(queries, (SPEED_QUERIES, queries.shape[1])))


def _measure(factories: tuple[str, str], sample: np.ndarray, tune_probe: _HeldOutProbe,
             check_probe: _HeldOutProbe, cfg: IndexConfig, best_seconds: float,
             rng: np.random.Generator) -> dict:
    """Build one candidate on the sample, tune its knob on one set of held-out queries (given
    up once a search that misses the target is :data:`GIVE_UP` times slower than
    ``best_seconds``, the fastest candidate's so far on the same queries: it cannot win), then
    its recall and queries/s on a second set."""
    import faiss

    small, full = factories
    s, d = sample.shape
    k = tune_probe.k
    t0 = time.perf_counter()
    index = faiss.index_factory(d, small, faiss.METRIC_INNER_PRODUCT)
    knob, params = _search_knob(index)
    if not index.is_trained:
        _train(index, sample, train_size(cfg, s, params.get("nlist", 1)), 0, rng)
    index.add(sample)
    build_s = time.perf_counter() - t0
    params = _fixed_params(small)
    set_search_params(index, params)
    reached, steps = True, []
    if knob is not None:
        lower = k if knob == "efSearch" else 1
        upper = max(lower, int(faiss.try_extract_index_ivf(index).nlist) if knob == "nprobe"
                    else 4096)
        # a search that misses the target and is already GIVE_UP times slower than the fastest
        # candidate so far cannot win: more lists / a wider beam only slow it more
        params[knob], steps, reached = tune(index, tune_probe, knob, _aim(cfg), upper=upper,
                                            lower=lower, give_up_seconds=GIVE_UP * best_seconds)
        set_search_params(index, params)
    return {
        "factory": full, "measured_as": small, "search_params": params,
        "reached_target": reached,
        "recall": round(check_probe.recall(index), 5) if reached else max(
            st["recall"] for st in steps),
        "queries_per_second": round(check_probe.qps(index), 1) if reached else None,
        "build_seconds": round(build_s, 3),
        "bytes_per_vector": round(faiss.serialize_index(index).size / s, 2),
        "tuning_steps": len(steps),
    }


def select_factory(vectors: np.ndarray, cfg: IndexConfig,
                   rng: np.random.Generator) -> tuple[str, dict, list[dict]]:
    """(factory for all of ``vectors``, the choice with its reason, the candidates measured).

    Every candidate of :func:`candidate_factories` is built on a random sample of
    ``cfg.select_sample`` vectors (all but the queries when N is smaller), its knob tuned to
    ``cfg.target_recall`` on held-out queries (vectors left out of the sample: fresh queries,
    not index rows), and its recall@k and queries/s measured at that setting on a second
    held-out set. The fastest reaching the target wins; Flat reaches it by construction, so the
    choice is never slower than exact search on the sample. Speed ratios measured on the sample
    carry over to N roughly linearly for IVF (list sizes are kept) and favour HNSW at larger N
    (its cost grows ~log N); :func:`build_index` re-checks the ratio on the full collection."""
    n, d = vectors.shape
    nq = max(1, min(cfg.recall_queries, n // 10))
    k = max(1, min(cfg.recall_k, n - 2 * nq))
    s = min(cfg.select_sample or n, n - 2 * nq)
    perm = rng.permutation(n)
    tune_q, check_q = vectors[np.sort(perm[:nq])], vectors[np.sort(perm[nq:2 * nq])]
    sample = vectors[np.sort(perm[2 * nq:2 * nq + s])]
    tune_probe = _HeldOutProbe(sample, tune_q, k)
    check_probe = _HeldOutProbe(sample, check_q, k)
    best_seconds = len(tune_q) / tune_probe.qps(_flat(sample))  # Flat's, then the fastest's
    candidates = []
    for pair in candidate_factories(n, d, s):
        t0 = time.perf_counter()
        try:
            c = _measure(pair, sample, tune_probe, check_probe, cfg, best_seconds, rng)
        except RuntimeError as e:  # a structure this FAISS build or shape cannot make
            c = {"factory": pair[1], "measured_as": pair[0], "reached_target": False,
                 "error": str(e).splitlines()[0][:200]}
        c["seconds"] = round(time.perf_counter() - t0, 3)  # build, tuning and timing
        candidates.append(c)
        if c.get("queries_per_second"):
            best_seconds = min(best_seconds, len(check_q) / c["queries_per_second"])
        log.info("index candidate %s: %s", pair[0], c)
    flat_qps = candidates[0]["queries_per_second"]
    for c in candidates:
        if c.get("queries_per_second"):
            c["speed_vs_flat"] = round(c["queries_per_second"] / flat_qps, 3)
    best = max((c for c in candidates if c["reached_target"]),
               key=lambda c: c["queries_per_second"])
    chosen = {
        "factory": best["factory"], "fastest_on_sample": best["factory"],
        "sample_search_params": best["search_params"],
        "reason": f"fastest of {len(candidates)} candidates reaching recall@{k} >= "
                  f"{cfg.target_recall} on {nq} held-out queries (vectors left out of a "
                  f"{s:,}-vector sample): {best['queries_per_second']:,.0f} queries/s, "
                  f"{best['speed_vs_flat']:.2f}x Flat",
        "sample": s, "queries": nq, "recall_k": k,
        "query_source": "held-out collection vectors, not in the measured index",
    }
    return best["factory"], chosen, candidates


def _tune_and_check(index, vectors: np.ndarray, cfg: IndexConfig, knob: str | None,
                    params: dict, ngpu: int, rng: np.random.Generator, fixed: dict | None = None,
                    start: int = 0):
    """(search params, tuning curve, recall@k on the check sample, k, check queries, the check
    probe with its timings, the check's own step-up curve).

    Leave-one-out queries from the collection: one sample tunes ``knob`` to the target plus
    ``recall_margin`` (:func:`tune`, galloping from ``start``, e.g. the value the sample chose),
    a disjoint one gives the recall reported. When that recall is still under the target the
    knob steps up until the check sample reaches it too (recorded): the index then ships at a
    setting that reached the target on both samples. ``fixed`` search parameters are set before
    tuning and kept."""
    n = len(vectors)
    k = min(cfg.recall_k, n - 1)
    if k < 1:
        return {}, [], 1.0, 0, 0, None, []
    tuned = knob is not None and not (knob == "nprobe" and cfg.nprobe)
    per = min(cfg.recall_queries, n // 2 if tuned else n)
    rows = rng.choice(n, size=per * (2 if tuned else 1), replace=False)
    search_params: dict = dict(fixed or {})
    curve: list[dict] = []
    step_up: list[dict] = []
    set_search_params(index, search_params)
    if tuned:
        lower = k if knob == "efSearch" else 1  # HNSW searches max(efSearch, k) anyway
        upper = params["nlist"] if knob == "nprobe" else 4096
        upper = max(lower, min(upper, 2048) if ngpu else upper)  # GPU IVF: at most 2048 lists
        value, curve, reached = tune(index, _RecallProbe(vectors, rows[:per], k), knob,
                                     _aim(cfg), upper=upper, lower=lower, start=start)
        if not reached:
            log.warning("recall target %.3f not reached: %s=%d gives %.4f", _aim(cfg), knob,
                        value, curve[-1]["recall"])
        search_params[knob] = value
    elif knob == "nprobe":
        search_params["nprobe"] = min(cfg.nprobe, params["nlist"])
    set_search_params(index, search_params)
    check = _RecallProbe(vectors, rows[-per:], k)
    recall = check.recall(index)
    if tuned and recall < cfg.target_recall and search_params[knob] < upper:
        value, step_up, _ = tune(index, check, knob, cfg.target_recall, upper=upper,
                                 lower=search_params[knob], start=search_params[knob])
        search_params[knob] = value
        set_search_params(index, search_params)
        recall = next(st["recall"] for st in step_up if st[knob] == value)
        log.info("check sample below target at the tuned %s: stepped up to %d (recall %.4f)",
                 knob, value, recall)
    return search_params, curve, recall, k, per, check, step_up


def build_index(vectors: np.ndarray, cfg: IndexConfig, *, progress: bool = True):
    """(CPU index with its search parameters set, metadata) for unit ``vectors`` (N, d).

    ``factory="auto"`` on the CPU above ``flat_max``: the structure :func:`select_factory`
    measures fastest at the target recall, built on all vectors and its knob re-tuned there;
    when the full index then searches slower than exact search on the check queries it is
    replaced by Flat. On GPUs, or at most ``flat_max`` vectors, :func:`resolve_factory`'s rule."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    rng = np.random.default_rng(cfg.seed)
    ngpu = gpus_to_use(cfg.use_gpu)
    auto = cfg.factory.strip().lower() == "auto"
    if not auto:
        chosen, candidates = {"factory": cfg.factory.strip(), "reason": "index.factory"}, []
    elif ngpu or n <= cfg.flat_max:
        chosen = {"factory": resolve_factory(cfg.factory, n, cfg.flat_max), "reason":
                  f"N <= index.flat_max ({cfg.flat_max:,}): exact search" if n <= cfg.flat_max
                  else "GPU build: IVF{4*sqrt(N)},Flat by rule (candidates are measured on "
                       "the CPU only)"}
        candidates = []
    else:
        t0 = time.perf_counter()
        _, chosen, candidates = select_factory(vectors, cfg, rng)
        chosen["select_seconds"] = round(time.perf_counter() - t0, 3)
    index, meta, check = _build(vectors, chosen["factory"], cfg, ngpu, rng, progress,
                                chosen.get("sample_search_params", {}))
    log.info("index %s built over %d vectors: train %.1f s, add %.1f s, tuning and check "
             "%.1f s (%s, recall %.4f)", meta["factory"], n, meta["train_seconds"],
             meta["add_seconds"], meta["recall_check_seconds"], meta["search_params"],
             meta["recall"])
    if candidates and meta["factory"] != "Flat" and check is not None:
        t0 = time.perf_counter()
        ratio = _speed_vs_exact(index, check)
        chosen["speed_vs_exact_full"] = round(ratio, 3)
        log.info("index %s: %.2fx exact search over all vectors (timed in %.1f s)",
                 meta["factory"], ratio, time.perf_counter() - t0)
    if candidates and meta["factory"] != "Flat" and check is not None and ratio < 1.0:
        log.warning("index %s searches at %.2fx exact search over all %d vectors: using Flat",
                    meta["factory"], ratio, n)
        chosen = {**chosen, "factory": "Flat", "reason": f"{chosen['factory']} was chosen on "
                  f"the sample but searched at {ratio:.2f}x exact search over all vectors"}
        index, meta, check = _build(vectors, "Flat", cfg, ngpu, rng, progress)
    meta["factory_config"] = cfg.factory
    meta["chosen"] = chosen
    meta["candidates"] = candidates
    return index, meta


def _speed_vs_exact(index, check: _RecallProbe) -> float:
    """Queries/s of ``index`` over those of exact search (``faiss.knn``, IndexFlatIP's kernel),
    on a batch of :data:`SPEED_QUERIES` check queries (repeated) over all vectors; best of
    :data:`FULL_REPEAT` each (exact search over 1M vectors answers ~250 queries/s on 2 cores)."""
    import faiss

    q = _batch(check.vectors[check.rows])
    t_index = t_exact = math.inf
    for _ in range(FULL_REPEAT):
        t0 = time.perf_counter()
        search(index, q, check.k + 1)
        t_index = min(t_index, time.perf_counter() - t0)
        t0 = time.perf_counter()
        faiss.knn(q, check.vectors, check.k + 1, metric=faiss.METRIC_INNER_PRODUCT)
        t_exact = min(t_exact, time.perf_counter() - t0)
    return t_exact / t_index


def _build(vectors: np.ndarray, factory: str, cfg: IndexConfig, ngpu: int,
           rng: np.random.Generator, progress: bool, start: dict | None = None):
    """(index, metadata, the recall check probe) for ``factory`` over all vectors; the knob's
    tuning starts from ``start``'s value for it (the setting chosen on the sample), if any."""
    import faiss
    from tqdm.auto import tqdm

    n, d = vectors.shape
    cpu = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    knob, params = _search_knob(cpu)

    t0 = time.perf_counter()
    trained_on = 0 if cpu.is_trained else train_size(cfg, n, params.get("nlist", 1))
    if trained_on:
        _train(cpu, vectors, trained_on, ngpu, rng)
    train_s = time.perf_counter() - t0

    index, ngpu = _to_gpus(cpu, cfg.use_gpu) if ngpu else (cpu, 0)
    t0 = time.perf_counter()
    with tqdm(total=n, desc="index add", unit="vec", unit_scale=True, disable=not progress) as bar:
        for s in range(0, n, cfg.add_batch):
            index.add(vectors[s:s + cfg.add_batch])
            bar.update(min(cfg.add_batch, n - s))
    add_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    search_params, curve, recall, k, nq, check, step_up = _tune_and_check(
        index, vectors, cfg, knob, params, ngpu, rng,
        _fixed_params(factory) if cfg.factory.strip().lower() == "auto" else None,
        int((start or {}).get(knob, 0)) if knob else 0)
    check_s = time.perf_counter() - t0
    if ngpu:
        index = faiss.index_gpu_to_cpu(index)
        set_search_params(index, search_params)
    meta = {
        "factory": factory, "factory_config": cfg.factory, "metric": "inner_product", "dim": d,
        "ntotal": int(index.ntotal), **params, "search_params": search_params,
        "target_recall": cfg.target_recall if curve else None,
        "tuned_to": _aim(cfg) if curve else None, "tuning": curve, "check_step_up": step_up,
        "train_sample": trained_on, "train_seconds": round(train_s, 3),
        "add_seconds": round(add_s, 3), "build_seconds": round(train_s + add_s, 3),
        "recall_check_seconds": round(check_s, 3),
        "recall": round(recall, 5), "recall_k": k, "recall_queries": nq,
        "recall_method": "leave-one-out collection vectors as queries vs exact inner product; "
                         "nprobe/efSearch tuned to target + margin on a disjoint sample (and "
                         "stepped up where this sample was still below the target)",
        "device": "gpu" if ngpu else "cpu", "gpus": ngpu, "faiss_version": faiss.__version__,
    }
    return index, meta, check


# -- files -----------------------------------------------------------------------------------

def save_index(index, note_ids: list[str], meta: dict, out_dir: str) -> dict:
    """Write index.faiss, ids.parquet and index.json; returns meta with the sizes added."""
    import faiss

    # straight to disk (a temporary file streamed up for gs://): no copy of the index in memory
    with storage.local_target(storage.join(out_dir, "index.faiss")) as path:
        faiss.write_index(index, path)
        size = os.path.getsize(path)
    meta = {**meta, "index_bytes": size, "bytes_per_vector": round(size / max(1, index.ntotal), 2)}
    write_table(pd.DataFrame({"note_id": note_ids, "position": np.arange(len(note_ids))}),
                storage.join(out_dir, "ids.parquet"))
    storage.write_text(storage.join(out_dir, "index.json"), json.dumps(meta, indent=2))
    return meta


def load_index(index_dir: str):
    """(CPU index with the recorded search parameters applied, note ids by position, metadata).

    Search it with :func:`search`; position i of the results is ``ids[i]``."""
    import faiss

    meta = json.loads(storage.read_text(storage.join(index_dir, "index.json")))
    with storage.local_copy(storage.join(index_dir, "index.faiss")) as local:
        index = faiss.read_index(local)
    table = read_table(storage.join(index_dir, "ids.parquet")).sort_values("position")
    if len(table) != index.ntotal:
        raise ValueError(f"{index_dir}: ids.parquet has {len(table)} ids for an index of "
                         f"{index.ntotal} vectors")
    set_search_params(index, meta.get("search_params", {}))
    return index, table["note_id"].tolist(), meta


def run(embeddings_dir: str, out_dir: str, cfg: IndexConfig, *, progress: bool = True) -> dict:
    table, vectors = read_vectors(storage.join(embeddings_dir, "notes.parquet"))
    check_vectors(table["note_id"], vectors, cfg.expected_dim)
    index, meta = build_index(vectors, cfg, progress=progress)
    meta = save_index(index, table["note_id"].tolist(), meta, out_dir)
    log.info("index %s over %d vectors on %s: built in %.1f s, recall@%d vs exact %.4f (%s), "
             "%.1f bytes/vector", meta["factory"], meta["ntotal"], meta["device"],
             meta["build_seconds"], meta["recall_k"], meta["recall"],
             meta["search_params"] or "exact", meta["bytes_per_vector"])
    log.info("index choice: %s (%s)", meta["chosen"]["factory"], meta["chosen"]["reason"])
    return meta
