"""Pair mining at scale: the step's two engines on a generated events.parquet, each run in its
own child process, timing it and reading its peak RSS (``os.wait4``'s rusage of that child).

  in_memory  the whole log read and scored at once (mine.in_memory_max_events above the size)
  buckets    streamed by row groups into user buckets on local disk, one bucket scored at a time
             (mine.in_memory_max_events at its default, or a quarter of a smaller log)

Both mine with the step's default config (time split, symmetric, min_users 2, top 10) through
``components.mine_pairs.run.run`` and write the same files; agreement of the pair counts is
reported. Events are generated in chunks and written as they come, never held all at once.

    python tests/benchmarks/bench_mine_scale.py --events 10000000            # both engines
    python tests/benchmarks/bench_mine_scale.py --events 100000000 --engines buckets \
        --max-rss-gib 4          # kills the run and exits 1 when over the bound
    MINE_SCALE_LOG=1 python ...  # the step's progress (stages, counts) on stderr

``bench_scale(n)`` returns rows shaped like run_all.py's (name, ours, baseline, ratio, note).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CHUNK = 1 << 20  # events generated and written at a time (one Parquet row group)


def write_events(path: str, n: int, seed: int = 0) -> None:
    """(n,) events as bench_mine_pairs.synthetic_events shapes them (sessions of ~10 events a
    minute apart over a week, heavy-tailed users and notes, a click in four), written chunk by
    chunk; users are per chunk, notes shared by all chunks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n_notes = max(n // 5, 1)
    writer = None
    try:
        for i, start in enumerate(range(0, n, CHUNK)):
            m = min(CHUNK, n - start)
            n_sessions, n_users = max(m // 10, 1), max(m // 25, 1)
            session = np.sort(rng.integers(0, n_sessions, m))
            begin = rng.uniform(0, 7 * 86400, n_sessions)
            gaps = np.cumsum(rng.exponential(60.0, m))
            t = begin[session] + gaps - gaps[np.searchsorted(session, session, "left")]
            user = (n_users * rng.random(n_sessions) ** 2).astype(np.int64)[session]
            note = (n_notes * rng.random(m) ** 2).astype(np.int64)
            table = pa.table({
                "user_id": pa.array(np.char.add(f"u{i}_", user.astype(str))),
                "note_id": pa.array(np.char.add("n", note.astype(str))),
                "event": pa.array(np.where(rng.random(m) < 0.25, "click", "view")),
                "ts": pa.array(pd.Timestamp("2024-05-01", tz="UTC").value // 1000
                               + np.round(t * 1e6).astype(np.int64), pa.timestamp("us", "UTC"))})
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table, row_group_size=CHUNK)
    finally:
        if writer is not None:
            writer.close()


def _child(path: str, out: str, engine: str) -> None:
    import logging

    import pyarrow.parquet as pq

    if os.environ.get("MINE_SCALE_LOG"):  # the step's progress on stderr: time, RSS now, peak
        def rss(record: logging.LogRecord) -> bool:
            with open("/proc/self/status") as f:
                kib = dict(line.split(":", 1) for line in f)
            record.rss = "RSS {:.2f} GiB, peak {:.2f}".format(
                *(int(kib[k].split()[0]) / 2**20 for k in ("VmRSS", "VmHWM")))
            return True

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(rss)s  %(message)s")
        logging.getLogger().handlers[0].addFilter(rss)

    from components.common.config import MineConfig
    from components.mine_pairs.run import run

    n = pq.ParquetFile(path).metadata.num_rows
    # buckets: the default limit, or a quarter of the log when that is under it
    cfg = MineConfig(in_memory_max_events=min(MineConfig().in_memory_max_events, max(n // 4, 1))
                     if engine == "buckets" else 10**15)
    summary = run(path, out, cfg)
    assert summary["engine"]["name"] == engine, summary["engine"]
    print(json.dumps({"pairs": summary["pairs"], "engine": summary["engine"]}))


def _rss_gib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(x for x in f if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 2**20
    except (OSError, StopIteration):
        return 0.0


def measure(path: str, engine: str, kill_over_gib: float | None = None) -> dict:
    """Seconds, peak RSS (GiB) and the pair counts of one engine's run in a child process.

    With ``kill_over_gib`` the child is killed as soon as its RSS passes that bound (polled
    twice a second), so that a run over budget stops early on a shared machine; it then raises
    naming the time it got to."""
    import threading

    with tempfile.TemporaryDirectory(prefix="mine-scale-out-") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", path, out,
                                 engine], stdout=subprocess.PIPE, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": ROOT})
        killed: list[float] = []

        def watch() -> None:
            while proc.poll() is None:
                rss = _rss_gib(proc.pid)
                if rss > kill_over_gib:
                    killed.append(rss)
                    proc.kill()
                    return
                time.sleep(0.5)

        if kill_over_gib is not None:
            threading.Thread(target=watch, daemon=True).start()
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
    if killed:
        raise RuntimeError(f"{engine} mining killed at {killed[0]:.2f} GiB RSS, over "
                           f"{kill_over_gib:.2f} GiB, after {seconds:.0f} s")
    if proc.returncode:
        raise RuntimeError(f"{engine} mining failed (exit {proc.returncode})")
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    return {"engine": engine, "seconds": seconds,
            "peak_rss_gib": usage.ru_maxrss * 1024 / 2**30,  # ru_maxrss is KiB on Linux
            "pairs": result["pairs"]}


def bench_scale(n: int, engines: tuple[str, ...] = ("in_memory", "buckets"),
                kill_over_gib: float | None = None) -> list[tuple]:
    with tempfile.TemporaryDirectory(prefix="mine-scale-") as tmp:
        path = os.path.join(tmp, "events.parquet")
        t0 = time.perf_counter()
        write_events(path, n)
        gen = time.perf_counter() - t0
        runs = {e: measure(path, e, kill_over_gib) for e in engines}
    rows = []
    for e, r in runs.items():
        agree = len({json.dumps(x["pairs"]) for x in runs.values()}) == 1
        same = "" if len(runs) < 2 else f", pairs same as the other engine: {agree}"
        rows.append((f"mine step ({e}), {n:,} events", f"{r['seconds']:.1f} s",
                     f"{r['peak_rss_gib']:.2f} GiB peak RSS", "",
                     f"pairs {r['pairs']}{same}; generated in {gen:.0f} s"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--engines", default="in_memory,buckets")
    ap.add_argument("--max-rss-gib", type=float, default=None,
                    help="exit 1 when an engine's peak RSS exceeds this")
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return
    # over the bound the child is killed at once (plus 5 %: the poll lags the allocation)
    try:
        rows = bench_scale(args.events, tuple(args.engines.split(",")),
                           None if args.max_rss_gib is None else 1.05 * args.max_rss_gib)
    except RuntimeError as e:
        print(e)
        sys.exit(1)
    from table import print_table

    print_table(rows, 1)
    if args.max_rss_gib is not None:
        over = [r for r in rows if float(r[2].split()[0]) > args.max_rss_gib]
        if over:
            print(f"over {args.max_rss_gib} GiB peak RSS: {[r[0] for r in over]}")
            sys.exit(1)


if __name__ == "__main__":
    main()
