"""`make bench`: speed figures with same-run baselines. Prints a table; nothing is asserted.

  exact R@K: counting ranks (ours)      vs  sorting every query's scores (reference style)
  paired bootstrap (champion vs challenger) count-matrix products vs a loop over resamples
  official CSV reader (notes/s)          vs  pandas.read_csv on the same file (no topic parsing)
  tiny-model encode (notes/s, CPU)       length-sorted vs unsorted batches, skewed lengths
  pair mining from events                 NumPy window search vs a DuckDB range join
  pair mining step, 10M events (1M quick)  in-memory vs user-bucket engine: time, peak RSS
  FAISS index, 1M x 64-d, 2 collections   index chosen by measurement vs IndexFlatIP (well + weakly clustered)
  tiny-model training (pairs/s, CPU)     2 DeepSpeed processes vs 1, one thread each
  embed fan-out (notes/s)                 2 shard processes vs 1
  ZeRO-3 host memory (peak RSS per rank)  ZeRO-3 vs ZeRO-2, ~127M-param bf16 checkpoint, 2/4 procs
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def timeit(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_ranks(pool_n: int, queries_n: int, repeat: int) -> list[tuple]:
    from components.evaluate.metrics import partner_ranks

    rng = np.random.default_rng(0)
    pool = rng.standard_normal((pool_n, 64)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    queries = pool[:queries_n] + 0.3 * rng.standard_normal((queries_n, 64)).astype(np.float32)
    target = np.arange(queries_n)

    def ours():
        return partner_ranks(queries, pool, target, chunk=512)

    def reference():  # sort each chunk of scores and look the partner up
        out = np.empty(queries_n, dtype=np.int64)
        for s in range(0, queries_n, 512):
            scores = queries[s:s + 512] @ pool.T
            order = np.argsort(-scores, axis=1, kind="stable")
            out[s:s + 512] = np.argmax(order == target[s:s + 512, None], axis=1)
        return out

    def gemm():  # the floor: scoring the pool, which any exact method has to do
        for s in range(0, queries_n, 512):
            queries[s:s + 512] @ pool.T

    agree = float(np.mean(ours() == reference()))
    t_ours, t_ref, t_gemm = (timeit(ours, repeat), timeit(reference, repeat),
                             timeit(gemm, repeat))
    gflops = 2.0 * queries_n * pool_n * pool.shape[1] / t_gemm / 1e9
    return [(f"exact ranks, pool {pool_n}x64, {queries_n} queries", f"{t_ours:.3f} s",
             f"{t_ref:.3f} s (argsort)", f"{t_ref / t_ours:.1f}x",
             f"agree {agree:.4f}; GEMM floor {t_gemm:.3f} s ({gflops:.0f} GFLOP/s), ours "
             f"{t_ours / t_gemm:.2f}x the floor")]


def bench_bootstrap(queries_n: int, resamples: int, repeat: int) -> list[tuple]:
    from components.evaluate.compare import paired_bootstrap, paired_bootstrap_loop

    rng = np.random.default_rng(0)
    ks = np.array([10, 20, 50, 100, 1000, 10000, 100000, 1000000])
    ranks_a = rng.integers(0, 200_000, queries_n)
    ranks_b = np.maximum(0, ranks_a + rng.integers(-50, 60, queries_n))
    a, b = ranks_a[:, None] < ks, ranks_b[:, None] < ks  # (n, 8) hits

    def ours():
        return paired_bootstrap(a, b, resamples=resamples)

    def loop():
        return paired_bootstrap_loop(a, b, resamples=resamples)

    same = all(np.allclose(x, y, atol=1e-6) for x, y in zip(ours(), loop(), strict=True))
    t_ours, t_loop = timeit(ours, repeat), timeit(loop, repeat)
    return [(f"paired bootstrap, {resamples} resamples x {queries_n} queries x {len(ks)} K",
             f"{t_ours:.3f} s", f"{t_loop:.3f} s (Python loop over resamples)",
             f"{t_loop / t_ours:.1f}x", f"same intervals {same}")]


def bench_reader(n: int, repeat: int) -> list[tuple]:
    import pandas as pd

    from components.common.readers import _ImageIndex, _read_official_notes
    from components.common.schema import NoteDataset

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "notes_train.csv")
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            for i in range(n):
                w.writerow([f"n{i}", f"title {i}", f"some content {i} #Tag{i % 50}[话题]# more",
                            f"img{i}", "A@B@"])
        images = _ImageIndex(tmp)

        def ours():
            return _read_official_notes(path, "train", images, NoteDataset({}, {}))

        def baseline():
            return pd.read_csv(path, header=None, dtype=str, keep_default_na=False)

        t_ours, t_base = timeit(ours, repeat), timeit(baseline, repeat)
    return [(f"official notes CSV, {n} rows", f"{n / t_ours:,.0f} notes/s",
             f"{n / t_base:,.0f} notes/s (pandas.read_csv)", f"{t_base / t_ours:.2f}x",
             "ours also parses topics, resolves images")]


def _encode_worker(n: int, repeat: int, sort: bool, batch_size: int) -> dict:
    """Runs in a fresh process so that its peak RSS belongs to one mode only."""
    import resource

    from PIL import Image

    from components.common.config import resolve
    from model import NoteInput, build_model, encode

    cfg = resolve("tiny", ["model.max_tokens=320", "model.content_max_chars=1200"]).model
    model = build_model(cfg, corpus=[f"note {i} about things and more" for i in range(50)])
    rng = np.random.default_rng(0)
    # skewed lengths, as in real feeds: most notes short, one in eight long
    notes = [NoteInput(f"title {i}", "word " * (int(rng.integers(150, 220)) if i % 8 == 0
                                                else int(rng.integers(1, 6))), ("t",),
                       Image.new("RGB", (96, 96), (i % 255, 0, 0))) for i in range(n)]
    encode(model, notes[:batch_size], batch_size=batch_size, progress=False)  # warm up
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = timeit(lambda: encode(model, notes, batch_size=batch_size, progress=False,
                              sort_by_length=sort), repeat)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": t, "peak_rss_mib": peak / 1024, "growth_mib": (peak - base) / 1024}


def bench_encode(n: int, repeat: int) -> list[tuple]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    results = {}
    for sort in (True, False):  # a fresh process each, so peak memory belongs to one mode
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            results[sort] = pool.submit(_encode_worker, n, repeat, sort, 64).result()
    srt, uns = results[True], results[False]
    return [(f"tiny encode, {n} notes of skewed length, CPU, batch 64",
             f"{n / srt['seconds']:,.0f} notes/s", f"{n / uns['seconds']:,.0f} notes/s (unsorted)",
             f"{uns['seconds'] / srt['seconds']:.2f}x",
             f"peak RSS {srt['peak_rss_mib']:.0f} vs {uns['peak_rss_mib']:.0f} MiB; growth "
             f"while encoding {srt['growth_mib']:.0f} vs {uns['growth_mib']:.0f} MiB")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes, one repeat")
    args = ap.parse_args()
    repeat = 1 if args.quick else 3
    rows = []
    rows += bench_ranks(20_000 if args.quick else 100_000, 1000 if args.quick else 5000, repeat)
    rows += bench_bootstrap(20_000, 200 if args.quick else 1000, repeat)
    rows += bench_reader(20_000 if args.quick else 200_000, repeat)
    rows += bench_encode(256 if args.quick else 1024, repeat)
    from bench_mine_pairs import bench_mine

    rows += bench_mine(repeat, (20_000, 200_000) if args.quick else (200_000, 2_000_000))
    from bench_mine_scale import bench_scale

    rows += bench_scale(1_000_000 if args.quick else 10_000_000)  # single runs, time + peak RSS
    from bench_index import bench_index

    rows += bench_index(1, 100_000, 2_000) if args.quick else bench_index(repeat)
    from bench_train import bench_train

    rows += bench_train(repeat)
    from bench_embed import bench_embed

    rows += bench_embed(repeat, 300 if args.quick else 1000)
    from bench_zero3 import bench_zero3

    rows += bench_zero3(1, (2,) if args.quick else (2, 4))
    from table import print_table

    print_table(rows, repeat)


if __name__ == "__main__":
    main()
