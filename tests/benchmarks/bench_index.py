"""Index speed and quality: the index ``factory="auto"`` chooses by measurement vs exact search
(``IndexFlatIP``), on two collections:

* well clustered: unit vectors from a mixture of Gaussian clusters of varying sizes and spreads
  around topic centres (``clustered_unit_vectors``); target recall@100 >= 0.95 at >= 20x Flat;
* weakly clustered: many small, wide clusters (N/50 clusters, spread 3x, isotropic noise that
  fills all 64 dimensions), where IVF has to search about half its lists to reach recall@100
  0.95 and runs near exact search's speed; target: never below 1x Flat.

Queries are fresh: other draws near random collection vectors (``queries_near``), not rows of
the index. Rows (run_all.py's shape: name, ours, baseline, ratio, note): recall@100 vs exact,
queries/s, build time, memory, and the candidates the step measured. ``bench_index(repeat)``
returns them; ``python bench_index.py [--quick] [--n N]`` prints them.

Queries/s are medians of ``repeat`` alternating runs of both indexes over the same ``queries``
queries; recall is over those queries, against the exact results of the first timed Flat run
(IndexFlatIP answers ~100 queries/s over 1M vectors on 2 cores: a separate exact pass over more
queries would cost minutes). The index is built by the shipped ``build_index`` with the default
config, ``flat_max=0`` so that smaller collections are measured too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def clustered_unit_vectors(n: int, d: int = 64, clusters: int = 2000, topics: int = 100,
                           seed: int = 0, spread_scale: float = 1.0,
                           decay: float = 0.5) -> np.ndarray:
    """(n, d) float32 unit vectors with embedding-like structure.

    ``topics`` broad directions; ``clusters`` centres scattered around them; cluster sizes
    heavy-tailed (log-normal weights); each cluster its own spread (cosine to its centre from
    about 0.5 to 0.9 at ``spread_scale`` 1; larger is wider), noise anisotropic (a spectrum
    decaying as i^-``decay``, as learnt embeddings have; ``decay`` 0 is isotropic noise, which
    fills all d dimensions: the hardest case for a partitioning index).
    """
    rng = np.random.default_rng(seed)
    topic = _unit(rng.standard_normal((topics, d)))  # (topics, d)
    centre = _unit(topic[rng.integers(0, topics, clusters)]
                   + 0.6 * rng.standard_normal((clusters, d)) / np.sqrt(d))  # (clusters, d)
    weight = rng.lognormal(0.0, 1.0, clusters)
    label = rng.choice(clusters, size=n, p=weight / weight.sum())  # (n,)
    spread = (spread_scale
              * rng.lognormal(np.log(0.8), 0.35, clusters)).astype(np.float32)  # (clusters,)
    spectrum = (np.arange(1, d + 1, dtype=np.float64) ** -decay).astype(np.float32)
    spectrum *= np.sqrt(d / np.sum(spectrum ** 2))  # mean square 1: |noise| ~ spread
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 262_144):  # chunks keep the float64 temporaries small
        lab = label[s:s + 262_144]
        noise = rng.standard_normal((len(lab), d), dtype=np.float32) * spectrum / np.sqrt(d)
        out[s:s + len(lab)] = _unit(centre[lab] + spread[lab, None] * noise)
    return out


def queries_near(vectors: np.ndarray, n: int, noise: float = 0.3, seed: int = 1) -> np.ndarray:
    """(n, d) unit queries: random collection vectors moved by ``noise`` (norm of the offset)."""
    rng = np.random.default_rng(seed)
    base = vectors[rng.integers(0, len(vectors), n)]
    d = vectors.shape[1]
    return _unit(base + noise * rng.standard_normal((n, d), dtype=np.float32) / np.sqrt(d))


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's exact top-k found. found, truth (q, k) ids."""
    k = truth.shape[1]
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, truth, strict=True)]))


def _paired_qps(a, b, q: np.ndarray, k: int, repeat: int):
    """(median queries/s of index a, of index b, a's first result ids, b's first result ids).
    The two are searched alternately ``repeat`` times, so that load from other work on the
    machine falls on both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    found: list = [None, None]
    for _ in range(repeat):
        for j, index in enumerate((a, b)):
            t0 = time.perf_counter()
            _, ids = index.search(q, k)
            times[j].append(time.perf_counter() - t0)
            found[j] = ids if found[j] is None else found[j]
    return (len(q) / statistics.median(times[0]), len(q) / statistics.median(times[1]),
            found[0], found[1])


def bench_index(repeat: int, n: int = 1_000_000, queries: int = 2_000, k: int = 100,
                d: int = 64, collections: tuple[str, ...] = ("well", "weak")) -> list[tuple]:
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    rows: list[tuple] = []
    if "well" in collections:
        well = clustered_unit_vectors(n, d=d, clusters=max(50, min(2000, n // 500)))  # (n, d)
        rows += _bench_one("well clustered", well, repeat, queries, k, min_speed=20.0)
        del well
    if "weak" in collections:
        weak = clustered_unit_vectors(n, d=d, clusters=max(50, n // 50),
                                      topics=max(10, n // 500), spread_scale=3.0, seed=2,
                                      decay=0.0)  # (n, d)
        rows += _bench_one("weakly clustered", weak, repeat, queries, k, min_speed=1.0)
    return rows


def _bench_one(label: str, x: np.ndarray, repeat: int, queries: int, k: int,
               min_speed: float) -> list[tuple]:
    import faiss

    from components.common.config import IndexConfig
    from components.index.run import build_index

    n, d = x.shape
    t_start = time.perf_counter()
    q = queries_near(x, queries)  # (queries, d) fresh queries
    cfg = IndexConfig(flat_max=0, recall_k=k)  # measured at any n
    t0 = time.perf_counter()
    ours, meta = build_index(x, cfg, progress=False)
    t_ours_total = time.perf_counter() - t0
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    t_flat = time.perf_counter() - t0

    timed = q
    qps_ours, qps_flat, found, truth = _paired_qps(ours, flat, timed, k, repeat)
    recall = _recall(found, truth)  # (queries, k) ids each; truth from IndexFlatIP
    size_ours, size_flat = faiss.serialize_index(ours).size, faiss.serialize_index(flat).size
    params = _params(meta["search_params"])
    name = f"{label} {n:,}x{d}, {meta['factory']} {params}"
    cands = "; ".join(
        f"{c['factory']} {_params(c.get('search_params', {}))}: "
        + (f"{c['queries_per_second']:,.0f} q/s ({c['speed_vs_flat']:.1f}x), "
           f"recall {c['recall']:.3f}" if c.get("queries_per_second")
           else f"target not reached (best recall {c.get('recall', 0):.3f}; given up)")
        + f", build {c.get('build_seconds', 0):.1f} s, measured in {c.get('seconds', 0):.1f} s, "
          f"{c.get('bytes_per_vector', 0):.0f} B/vec"
        for c in meta["candidates"])
    chosen = meta["chosen"]
    return [
        (f"index recall@{k} vs exact, {name}, {queries:,} fresh queries", f"{recall:.4f}",
         "1.0000 (IndexFlatIP)", "", f"target >= {cfg.target_recall}; tuned to "
         f"{meta['tuned_to']} on {meta['recall_queries']} collection queries, build-time check "
         f"{meta['recall']:.4f} on {meta['recall_queries']} others"
         + (f" (stepped up to {_params(meta['search_params'])})" if meta["check_step_up"]
            else "")),
        (f"index search, {name}, k={k}, {len(timed):,} queries", f"{qps_ours:,.0f} queries/s",
         f"{qps_flat:,.0f} queries/s (IndexFlatIP)", f"{qps_ours / qps_flat:.1f}x",
         f"target >= {min_speed:g}x; {faiss.omp_get_max_threads()} OpenMP threads; "
         f"load average {os.getloadavg()[0]:.1f}"),
        (f"index build, {name}", f"{t_ours_total:.1f} s", f"{t_flat:.1f} s (IndexFlatIP add)",
         f"{t_ours_total / max(t_flat, 1e-9):.0f}x",
         f"choosing {chosen.get('select_seconds', 0):.1f} s on a {chosen.get('sample', n):,}-"
         f"vector sample; train {meta['train_seconds']:.1f} s, add {meta['add_seconds']:.1f} s, "
         f"tuning + check {meta['recall_check_seconds']:.1f} s"),
        (f"index memory, {name}", f"{size_ours / n:.1f} B/vector, {size_ours / 2**20:.0f} MiB",
         f"{size_flat / n:.1f} B/vector, {size_flat / 2**20:.0f} MiB (IndexFlatIP)",
         f"{size_ours / size_flat:.2f}x", "serialised index / ntotal; ids.parquet not counted"),
        (f"index candidates, {label}", meta["factory"], "", "",
         f"{chosen['reason']}; on all vectors "
         f"{chosen.get('speed_vs_exact_full', 1.0):.2f}x exact. {cands}. This collection's "
         f"whole entry (build, choice, bench searches) {time.perf_counter() - t_start:.0f} s"),
    ]


def _params(p: dict) -> str:
    return ",".join(f"{a}={b}" for a, b in p.items()) or "exact"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="100k vectors, 2k queries, one repeat")
    ap.add_argument("--n", type=int, default=1_000_000, help="collection size")
    ap.add_argument("--collections", default="well,weak",
                    help="which generated collections: well, weak or both (comma-separated)")
    args = ap.parse_args()
    repeat = 1 if args.quick else 3
    which = tuple(c.strip() for c in args.collections.split(","))
    rows = bench_index(repeat, 100_000 if args.quick else args.n, 2_000, collections=which)
    from table import print_table

    print_table(rows, repeat)


if __name__ == "__main__":
    main()
