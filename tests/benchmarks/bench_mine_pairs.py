"""Pair mining speed: our NumPy window search vs a DuckDB range join, on synthetic event logs.

  in memory: score_pairs(events DataFrame)          vs  DuckDB SQL over the same DataFrame
  files:     mine_pairs_files(Parquet, user buckets) vs  DuckDB reading the Parquet files itself

Both sides compute the same directed scores (view→click within the window, 1/N_u per click);
agreement is reported. The two sides alternate run by run, so that load from other work on the
machine falls on both alike. Prints a table; nothing is asserted. ``bench_mine(repeat)`` returns rows
shaped like run_all.py's (name, ours, baseline, ratio, note).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WINDOW_S = 3600.0
# directed scores as SQL; the equality on user_id makes it a hash join with a range residual
_SQL = """
WITH e AS (SELECT user_id, note_id, event = 'click' AS click, epoch_ns(ts) AS t FROM {src}),
c AS (SELECT row_number() OVER () AS cid, user_id, note_id AS b, t FROM e WHERE click),
v AS (SELECT user_id, note_id AS a, t FROM e WHERE NOT click),
n AS (SELECT user_id, count(*) AS n FROM c GROUP BY user_id),
co AS (SELECT DISTINCT c.cid, c.user_id, v.a, c.b FROM c JOIN v
       ON v.user_id = c.user_id AND v.t BETWEEN c.t - {window_ns} AND c.t WHERE v.a <> c.b)
SELECT a AS query_id, b AS target_id, sum(1.0 / n.n) AS score
FROM co JOIN n USING (user_id) GROUP BY a, b ORDER BY a, b
"""


def synthetic_events(n: int, seed: int = 0) -> pd.DataFrame:
    """(n,) events over one week: sessions of ~10 events a minute apart, heavy-tailed users and
    note popularity, one event in four a click."""
    rng = np.random.default_rng(seed)
    n_sessions, n_users, n_notes = max(n // 10, 1), max(n // 25, 1), max(n // 5, 1)
    session = np.sort(rng.integers(0, n_sessions, n))  # (n,)
    start = rng.uniform(0, 7 * 86400, n_sessions)  # (n_sessions,) seconds
    gaps = np.cumsum(rng.exponential(60.0, n))
    first = np.searchsorted(session, session, "left")  # offset of each event's session
    t = start[session] + gaps - gaps[first]
    user = (n_users * rng.random(n_sessions) ** 2).astype(np.int64)[session]
    note = (n_notes * rng.random(n) ** 2).astype(np.int64)
    return pd.DataFrame({
        "user_id": pd.Series(user).map("u{}".format), "note_id": pd.Series(note).map("n{}".format),
        "event": np.where(rng.random(n) < 0.25, "click", "view"),
        "ts": pd.Timestamp("2024-05-01", tz="UTC") + pd.to_timedelta(t, unit="s")})


def paired_medians(ours, baseline, repeat: int) -> tuple[float, float]:
    """Median seconds of each function, calling them alternately ``repeat`` times."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for fn, out in ((ours, times[0]), (baseline, times[1])):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def duckdb_scores(con, src: str) -> pd.DataFrame:
    return con.execute(_SQL.format(src=src, window_ns=round(WINDOW_S * 1e9))).df()


def _agreement(ours: pd.DataFrame, ref: pd.DataFrame) -> str:
    both = ours.merge(ref, on=["query_id", "target_id"], how="outer", indicator=True)
    same = bool((both["_merge"] == "both").all())
    diff = float((both["score_x"] - both["score_y"]).abs().max()) if same else float("nan")
    return f"{len(ours):,} pairs, same set {same}, max |diff| {diff:.1e}"


def bench_memory(n: int, repeat: int) -> tuple:
    import duckdb

    from components.mine_pairs.run import score_pairs

    events = synthetic_events(n)
    con = duckdb.connect()
    con.register("events", events)
    agree = _agreement(score_pairs(events, WINDOW_S), duckdb_scores(con, "events"))
    t_ours, t_ref = paired_medians(lambda: score_pairs(events, WINDOW_S),
                                   lambda: duckdb_scores(con, "events"), repeat)
    return (f"pair scores in memory, {n:,} events", f"{t_ours:.2f} s", f"{t_ref:.2f} s (DuckDB)",
            f"{t_ref / t_ours:.2f}x", agree)


def bench_files(n: int, repeat: int, files: int = 4) -> tuple:
    import duckdb

    from components.mine_pairs.run import MineConfig, mine_pairs, mine_pairs_files, select_pairs

    events = synthetic_events(n)
    cfg = MineConfig(window_s=WINDOW_S, symmetric=False, top_k=10**9,  # keep every pair
                    min_users=1)  # the plain scores DuckDB computes too
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"events-{i}.parquet") for i in range(files)]
        for path, part in zip(paths, np.array_split(np.arange(n), files), strict=True):
            events.iloc[part].to_parquet(path, index=False)
        con = duckdb.connect()
        src = f"read_parquet({paths!r})"

        def ours():
            return mine_pairs_files(paths, cfg, partitions=8)

        def ref():
            return select_pairs(duckdb_scores(con, src), cfg)[0]

        agree = _agreement(ours(), mine_pairs(events, cfg))
        t_ours, t_ref = paired_medians(ours, ref, repeat)
    return (f"mined pairs from {files} Parquet files, {n:,} events", f"{t_ours:.2f} s",
            f"{t_ref:.2f} s (DuckDB read_parquet)", f"{t_ref / t_ours:.2f}x",
            f"8 user buckets vs in-memory: {agree}")


def bench_mine(repeat: int, sizes: tuple[int, ...] = (200_000, 2_000_000)) -> list[tuple]:
    rows = [bench_memory(n, repeat) for n in sizes]
    return rows + [bench_files(sizes[-1], repeat)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes, one repeat")
    args = ap.parse_args()
    repeat = 1 if args.quick else 5
    rows = bench_mine(repeat, (20_000, 200_000) if args.quick else (200_000, 2_000_000))
    from table import print_table

    print_table(rows, repeat)


if __name__ == "__main__":
    main()
