"""mine_pairs: related-note pairs from view→click co-occurrence (NoteLLM §4.3).

Score of the directed pair A→B (A viewed, then B clicked, by the same user)::

    s(A→B) = Σ_u c_u(A→B) / N_u

``c_u(A→B)``  the number of user u's click events on B that have at least one view of A (A ≠ B)
              by u inside the click's window, ``t_c - window_s <= t_v <= t_c`` (both ends
              inclusive). Several views of A inside one click's window count once for that click.
``N_u``       the number of click events of user u in the events given (every click, whether or
              not a view precedes it; a repeated click counts again). Heavy clickers are damped.

Symmetric mode scores the undirected pair {A, B} as ``s(A→B) + s(B→A)`` and writes it once, with
``query_id < target_id``; a pair is kept when it is among the ``top_k`` partners of either of its
notes. Directed mode writes ``query_id = A``, ``target_id = B`` and keeps each query note's
``top_k`` targets. Ties are broken by the partner id, ascending.

Support: with ``min_users`` > 1 a pair is kept only when at least that many distinct users
produced it (in symmetric mode a user counts once for {A, B}, whichever direction(s) they
produced), before the outlier drop and top-k. One user's chance co-view of two unrelated notes is
so removed. Where the threshold would leave a pair to fewer than ``MIN_USERS_COVERAGE`` (3/4) of
the notes that have any, the log is too sparse for it: it is not applied, a warning says so and
the step's stats record it (``min_users.applied``).

The engine is NumPy: events are sorted by (user, time) once, each click finds its window of views
with two binary searches and the (click, view) matches are expanded with ``np.repeat``; no Python
loop touches events. ``tests/benchmarks/bench_mine_pairs.py`` measures it against a DuckDB range
join. Logs larger than memory go through :func:`mine_pairs_files`, which buckets users by hash
and spills the partial pair scores to pair partitions by note (:class:`_Partial`), so neither
the events nor the pair table is held whole; the step (:func:`run`, :func:`step`) takes that path
by itself above ``mine.in_memory_max_events`` (counted from the Parquet footer, or estimated from
a CSV/JSONL file's size), with the same pairs.
``pairs.sql`` is the same miner as one warehouse query (:func:`warehouse_sql`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from components.common import storage
from components.common.canonical import derive_canonical, load_canonical
from components.common.config import MineConfig
from components.common.readers import _read_events, write_table
from components.common.schema import EVENT_COLUMNS, EVENT_TYPES, PAIR_COLUMNS, DataError, where

log = logging.getLogger(__name__)

_QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
# mine.min_users is applied only when the notes keeping a pair are at least this share of those
# with any scored pair; below it the log is too sparse for a support threshold and it falls back
MIN_USERS_COVERAGE = 0.75
_ONE_KEY_LIMIT = 2**62  # (user, pair) packs into one int64 below this many combinations


def _epoch_ns(ts: pd.Series, file: str = "events", first_row: int = 1) -> np.ndarray:
    """Event times as int64 nanoseconds since the epoch; numbers are taken as seconds.

    A missing or unparseable time raises :class:`DataError` naming ``file``, the row (``first_row``
    is the file row of ``ts``'s first element) and the field."""
    if pd.api.types.is_numeric_dtype(ts):
        bad = ~np.isfinite(ts.to_numpy(np.float64))
        parsed = None
    else:
        if not isinstance(ts.dtype, pd.DatetimeTZDtype | np.dtypes.DateTime64DType):
            parsed = pd.to_datetime(ts, utc=True, format="ISO8601", errors="coerce")
        elif getattr(ts.dt, "tz", None) is None:
            parsed = ts.dt.tz_localize("UTC")
        else:
            parsed = ts
        bad = parsed.isna().to_numpy()
    if bad.any():
        i = int(bad.argmax())
        raise DataError(f"{where(file, first_row + i, 'ts')}: unparseable timestamp "
                        f"{ts.iloc[i]!r}")
    if parsed is None:
        return np.round(ts.to_numpy(np.float64) * 1e9).astype(np.int64)
    return parsed.dt.as_unit("ns").astype("int64").to_numpy()


def _prepare(events: pd.DataFrame, file: str = "events", first_row: int = 1) -> pd.DataFrame:
    """Columns user_id, note_id (str), click (bool), t (int64 ns); checks columns and values.

    ``first_row`` is the file row number of the frame's first row, for error messages.
    """
    missing = [c for c in EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise DataError(f"{file}: missing column(s) {', '.join(repr(c) for c in missing)} "
                        f"(every row); the table has {', '.join(map(str, events.columns))}")
    kind = events["event"].astype(str).str.strip()
    unknown = ~kind.isin(EVENT_TYPES)
    if unknown.any():
        i = int(unknown.to_numpy().argmax())
        raise DataError(f"{where(file, first_row + i, 'event')}: unknown event {kind.iloc[i]!r} "
                        f"(expected one of {', '.join(EVENT_TYPES)})")
    # Series, not NumPy: Arrow-backed strings factorize fast and copying them out costs
    return pd.DataFrame({"user_id": events["user_id"].astype(str).reset_index(drop=True),
                         "note_id": events["note_id"].astype(str).reset_index(drop=True),
                         "click": (kind == "click").to_numpy(),
                         "t": _epoch_ns(events["ts"], file, first_row)})


def _group_sum(key: np.ndarray, weight: np.ndarray, count: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(distinct keys ascending, summed weight per key, summed integer ``count`` per key or None);
    a stable sort fixes the summing order."""
    order = np.argsort(key, kind="stable")
    k = key[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]]) if len(k) else np.zeros(0, np.int64)
    sums = np.add.reduceat(weight[order], starts) if len(k) else np.zeros(0)
    counts = None if count is None else (
        np.add.reduceat(count[order].astype(np.int64), starts) if len(k) else np.zeros(0, np.int64))
    return k[starts], sums, counts


def _cooccur(user: np.ndarray, note: np.ndarray, click: np.ndarray, t: np.ndarray, window_ns: int,
             n_notes: int, support: str | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Directed scores from integer-coded events.

    user, note: (n_events,) int codes; click: (n_events,) bool; t: (n_events,) int64 ns.
    Returns (a, b, score, users): (n_pairs,) viewed-note codes, clicked-note codes, float64
    scores, sorted by (a, b); ``users`` is None unless ``support`` is given, then (n_pairs,) int64
    distinct-user counts: with "directed" the users who produced A→B; with "symmetric" each user is
    counted on one direction of {A, B} only, so that summing both directions counts the distinct
    users of the undirected pair. Users never span calls, so counts from disjoint user sets add.
    """
    n = len(t)
    # Rank the times so that (user, time) packs into one sortable int64 and ties stay tied:
    # a view is in a click's window iff since(click) <= below(view) < upto(click).
    # Ties may land in any order here: tied events share their keys, and tied clicks of one user
    # carry equal weights, so every sum below comes out bit for bit the same.
    by_t = np.argsort(t)
    st = t[by_t]
    first = np.flatnonzero(np.r_[True, st[1:] != st[:-1]])  # starts of runs of equal times
    size = np.diff(np.r_[first, n])
    below, upto, since = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    below[by_t] = np.repeat(first, size)  # number of times < t
    upto[by_t] = np.repeat(first + size, size)  # number of times <= t
    since[by_t] = np.searchsorted(st, st - window_ns)  # number of times < t - window
    base = user.astype(np.int64) * (n + 1)
    order = np.argsort(base + below)  # events by (user, time)
    view, clk = order[~click[order]], order[click[order]]  # event indices, (n_views,) (n_clicks,)
    vkey = (base + below)[view]
    # both query arrays ascend like vkey, so the binary searches walk memory in order
    lo = np.searchsorted(vkey, (base + since)[clk])
    counts = np.searchsorted(vkey, (base + upto)[clk]) - lo  # views in each click's window
    click_of = np.repeat(clk, counts)  # (n_matches,) event index of the click
    view_of = view[np.arange(len(click_of)) - np.repeat(np.cumsum(counts) - counts - lo, counts)]
    a, b = note[view_of], note[click_of]
    keep = a != b
    click_of, a, b = click_of[keep], a[keep], b[keep]
    # one count per (click, viewed note), however often the note was viewed in the window
    once = ~pd.Series(click_of.astype(np.int64) * n_notes + a).duplicated().to_numpy()
    n_clicks = np.bincount(user[click], minlength=int(user.max(initial=-1)) + 1)  # N_u
    a, b, u = a[once].astype(np.int64), b[once].astype(np.int64), user[click_of[once]]
    first = None
    if support is not None:
        pair = np.minimum(a, b) * n_notes + np.maximum(a, b) if support == "symmetric" else \
            a * n_notes + b
        # a user's first match of each pair carries the 1 (in symmetric mode on the direction of
        # that match), the rest 0
        n_users = int(user.max(initial=-1)) + 1
        if n_users * n_notes * n_notes < _ONE_KEY_LIMIT:  # one int64 key hashes faster than two
            first = ~pd.Series(u.astype(np.int64) * (n_notes * n_notes) + pair).duplicated()
        else:
            first = ~pd.DataFrame({"u": u, "p": pair}).duplicated()
        first = first.to_numpy()
    pairs, score, users = _group_sum(a * n_notes + b, 1.0 / n_clicks[u], first)
    return pairs // n_notes, pairs % n_notes, score, users


def _support(cfg: MineConfig) -> str | None:
    """What :func:`_cooccur` counts users for under ``cfg``: None when no threshold is set."""
    if cfg.min_users <= 1:
        return None
    return "symmetric" if cfg.symmetric else "directed"


def _score_codes(ev: pd.DataFrame, window_s: float, support: str | None = None
                 ) -> tuple[pd.Index, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(ids, a, b, score, users) of :func:`_cooccur` for prepared events; ``ids[code]`` is the
    note id."""
    user, _ = pd.factorize(ev["user_id"])
    note, ids = pd.factorize(ev["note_id"], sort=True)  # code order = id order
    a, b, score, users = _cooccur(user, note, ev["click"].to_numpy(bool),
                                  ev["t"].to_numpy(np.int64), round(window_s * 1e9),
                                  max(len(ids), 1), support)
    return ids, a, b, score, users


def _frame(ids: pd.Index, q: np.ndarray, t: np.ndarray, s: np.ndarray,
           users: np.ndarray | None = None) -> pd.DataFrame:
    frame = pd.DataFrame({"query_id": ids.take(q).astype(str),
                          "target_id": ids.take(t).astype(str), "score": s.astype(np.float64)})
    return frame if users is None else frame.assign(users=users.astype(np.int64))


def score_pairs(events: pd.DataFrame, window_s: float) -> pd.DataFrame:
    """Directed co-occurrence scores: query_id = viewed note A, target_id = clicked note B.

    events: (n_events,) rows of user_id, note_id, event (view|click), ts (datetime, ISO string
    or epoch seconds). Returns (n_pairs,) rows of query_id, target_id, score (float64), every pair
    with a positive score, sorted by (query_id, target_id). No outlier drop, no top-k.
    """
    return _frame(*_score_codes(_prepare(events), window_s)[:4])


# -- selection -----------------------------------------------------------------------------------


def _top_k(ends: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Rows (n,) among the k best of their end note: score desc, then partner id asc.

    The rows must list each end note's partners in ascending id order: the stable sort keeps that
    order among equal scores (3x faster than sorting on the partner as a third key).
    """
    order = np.lexsort((-score, ends))
    e = ends[order]
    starts = np.flatnonzero(np.r_[True, e[1:] != e[:-1]]) if len(e) else np.zeros(0, np.int64)
    rank = np.arange(len(e)) - np.repeat(starts, np.diff(np.r_[starts, len(e)]))
    return order[rank < k]


def _n_notes(q: np.ndarray, t: np.ndarray) -> int:
    return len(np.unique(np.r_[q, t]))


def _min_users(q: np.ndarray, t: np.ndarray, users: np.ndarray | None, cfg: MineConfig,
               stats: dict) -> np.ndarray | None:
    """Rows (bool mask) meeting ``cfg.min_users``, or None when every row stays: no threshold, or
    too few notes would keep a pair (the fallback, with a warning)."""
    if cfg.min_users <= 1:
        return None
    if users is None:
        raise ValueError(f"min_users={cfg.min_users} needs distinct-user counts per pair "
                         "(a 'users' column); these scores have none")
    keep = users >= cfg.min_users
    before, after = _n_notes(q, t), _n_notes(q[keep], t[keep])
    stats["min_users"] = {"threshold": cfg.min_users, "pairs_kept": int(keep.sum()),
                          "notes_with_pairs": before, "notes_kept": after,
                          "applied": after >= MIN_USERS_COVERAGE * before}
    if not stats["min_users"]["applied"]:
        log.warning("mine.min_users=%d would leave %d of %d notes with a pair (%d of %d pairs), "
                    "under %.0f %%: too sparse for a support threshold, so every pair is kept",
                    cfg.min_users, after, before, int(keep.sum()), len(keep),
                    100 * MIN_USERS_COVERAGE)
        return None
    return keep


def _select_codes(a: np.ndarray, b: np.ndarray, s: np.ndarray, n_ids: int, cfg: MineConfig,
                  users: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Symmetrise (per cfg), drop pairs under ``min_users``, drop score outliers, keep top-k
    partners per note.

    a, b: (n,) note codes whose order is the id order; s: (n,) directed scores; users: (n,)
    distinct-user counts as :func:`_cooccur` gives them for ``_support(cfg)`` (needed only when
    ``cfg.min_users`` > 1; rows of one (a, b) are summed). Returns (query, target, score, stats)
    sorted by (query, target); stats counts each stage.
    """
    n = np.int64(max(n_ids, 1))
    q, t = (np.minimum(a, b), np.maximum(a, b)) if cfg.symmetric else (a, b)
    key, s, users = _group_sum(q.astype(np.int64) * n + t, s,
                               users if cfg.min_users > 1 else None)
    q, t = key // n, key % n
    stats: dict = {"scored_pairs": len(s)}
    keep = _min_users(q, t, users, cfg, stats)
    if keep is not None:
        q, t, s = q[keep], t[keep], s[keep]
    stats["after_min_users"] = len(s)
    lo_q, hi_q = cfg.min_score_quantile, cfg.max_score_quantile
    if len(s) and (lo_q > 0.0 or hi_q < 1.0):
        lo, hi = np.quantile(s, [lo_q, hi_q])
        inside = (s >= lo) & (s <= hi)
        q, t, s = q[inside], t[inside], s[inside]
        stats["score_bounds"] = [float(lo), float(hi)]
    stats["after_outlier_drop"] = len(s)
    if cfg.symmetric:
        # each undirected pair ranked from both notes, either may keep it; rows are sorted by
        # (q, t) and q < t, so [t-ends, q-ends] lists every note's partners in ascending order
        rows = _top_k(np.r_[t, q], np.r_[s, s], cfg.top_k)
        kept = np.zeros(len(s), bool)
        kept[rows % max(len(s), 1)] = True
        kept = np.flatnonzero(kept)
    else:
        kept = np.sort(_top_k(q, s, cfg.top_k))
    stats["after_top_k"] = len(kept)
    return q[kept], t[kept], s[kept], stats


def select_pairs(scores: pd.DataFrame, cfg: MineConfig) -> tuple[pd.DataFrame, dict]:
    """:func:`_select_codes` on a frame of directed scores (as from :func:`score_pairs`).

    Duplicate (query_id, target_id) rows are summed, and so is their ``users`` column, which
    ``cfg.min_users`` > 1 needs (distinct-user counts as :func:`_cooccur` gives them, from
    disjoint sets of users). Returns (pairs, stats), pairs sorted by (query_id, target_id).
    """
    codes, ids = pd.factorize(pd.concat([scores["query_id"], scores["target_id"]]), sort=True)
    a, b = np.split(codes, 2)
    users = scores["users"].to_numpy(np.int64) if "users" in scores.columns else None
    q, t, s, stats = _select_codes(a, b, scores["score"].to_numpy(np.float64), len(ids), cfg,
                                   users)
    return _frame(ids, q, t, s), stats


def _mine(ev: pd.DataFrame, cfg: MineConfig) -> tuple[pd.DataFrame, dict]:
    ids, a, b, s, users = _score_codes(ev, cfg.window_s, _support(cfg))
    q, t, s, stats = _select_codes(a, b, s, len(ids), cfg, users)
    clicks = int(ev["click"].sum())
    return _frame(ids, q, t, s), {"events": len(ev), "clicks": clicks, "views": len(ev) - clicks,
                                  "users": int(ev["user_id"].nunique()), **stats}


def mine_pairs(events: pd.DataFrame, cfg: MineConfig) -> pd.DataFrame:
    """Related pairs (n_pairs,) of query_id, target_id, score (float64) from an event log.

    events: rows of user_id, note_id, event (view|click), ts. Scores, symmetry, the outlier drop
    and top-k follow the module docstring and ``cfg``.
    """
    return _mine(_prepare(events), cfg)[0]


# -- logs larger than memory ---------------------------------------------------------------------


def _batches(path: str, rows: int) -> Iterator[pd.DataFrame]:
    """Event rows of one Parquet or CSV file, ``rows`` at a time."""
    with storage.local_copy(path) as local:
        if path.endswith(".parquet"):
            for batch in pq.ParquetFile(local).iter_batches(rows, columns=EVENT_COLUMNS):
                yield batch.to_pandas()
        elif path.endswith(".csv"):
            opts = pacsv.ConvertOptions(column_types=dict.fromkeys(EVENT_COLUMNS, pa.string()),
                                        include_columns=EVENT_COLUMNS)
            with pacsv.open_csv(local, convert_options=opts,
                                read_options=pacsv.ReadOptions(block_size=64 << 20)) as reader:
                for batch in reader:
                    yield batch.to_pandas()
        elif path.endswith(".jsonl"):
            import pyarrow.json as pajson

            schema = pa.schema([(c, pa.string()) for c in EVENT_COLUMNS])
            opts = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
            with pajson.open_json(local, parse_options=opts,
                                  read_options=pajson.ReadOptions(block_size=64 << 20)) as reader:
                for batch in reader:
                    yield batch.to_pandas()
        else:
            raise DataError(f"{storage.basename(path)}: expected a .parquet, .csv or .jsonl "
                            "event file")


def _bucket(paths: Sequence[str], tmp: str, partitions: int, batch_rows: int,
            keep_notes: Collection[str] | None = None) -> dict:
    """Stream event files, ``batch_rows`` at a time, into ``partitions`` Parquet buckets under
    ``tmp`` by a hash of user_id (so each user, and so N_u, lies whole in one bucket).

    Rows naming a note outside ``keep_notes`` (when given) are dropped and counted. Returns
    {"buckets": paths of the non-empty buckets, "read", "dropped"}.
    """
    writers: dict[int, pq.ParquetWriter] = {}
    keep = None if keep_notes is None else pa.array(list(keep_notes), pa.string())
    read = dropped = 0
    try:
        for path in paths:
            row = 1
            for batch in _batches(path, batch_rows):
                ev = _prepare(batch, storage.basename(path), row)
                row += len(batch)
                read += len(ev)
                ev["user_id"] = ev["user_id"].str.strip()  # as the in-memory reader does
                ev["note_id"] = ev["note_id"].str.strip()
                if keep is not None:
                    known = pc.is_in(pa.array(ev["note_id"], pa.string()),
                                     value_set=keep).to_numpy(zero_copy_only=False)
                    dropped += int((~known).sum())
                    ev = ev[known]
                bucket = pd.util.hash_array(ev["user_id"].to_numpy(object)) % partitions
                for p, part in ev.groupby(bucket, sort=False):
                    table = pa.Table.from_pandas(part, preserve_index=False)
                    if p not in writers:
                        writers[p] = pq.ParquetWriter(os.path.join(tmp, f"{p}.parquet"),
                                                      table.schema)
                    writers[p].write_table(table)
    finally:
        for w in writers.values():
            w.close()
    return {"buckets": [os.path.join(tmp, f"{p}.parquet") for p in sorted(writers)],
            "read": read, "dropped": dropped}


_SELECT_ROWS = 1 << 22  # a k-th smallest search gathers the values once this few are left


def _kth_time(buckets: Sequence[str], k: int) -> int:
    """The k-th smallest (0-based) event time ``t`` across bucket files, holding a histogram and
    at most ``_SELECT_ROWS`` times, not the column: each pass reads ``t`` bucket by bucket and
    narrows [lo, hi] to the histogram bin holding the k-th value."""
    def times() -> Iterator[np.ndarray]:
        for bucket in buckets:
            yield pq.read_table(bucket, columns=["t"])["t"].to_numpy()

    lo, hi = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    below, inside = 0, None  # values < lo; values in [lo, hi] (None: not yet counted)
    while True:
        if lo == hi and inside is not None:
            return lo
        if inside is not None and inside <= _SELECT_ROWS:
            got = np.sort(np.concatenate([t[(t >= lo) & (t <= hi)] for t in times()]))
            return int(got[k - below])
        if inside is None:  # first pass: the range itself
            lo = min((int(t.min()) for t in times() if len(t)), default=0)
            hi = max((int(t.max()) for t in times() if len(t)), default=0)
        width = (hi - lo) // 65536 + 1  # Python ints: no overflow
        hist = np.zeros(65536, np.int64)
        for t in times():
            t = t[(t >= lo) & (t <= hi)]
            hist += np.bincount((t - lo) // width, minlength=65536)[:65536]
        cum = np.cumsum(hist)
        b = int(np.searchsorted(cum, k - below, side="right"))
        below += int(cum[b - 1]) if b else 0
        inside = int(hist[b])
        lo, hi = lo + b * width, min(hi, lo + (b + 1) * width - 1)


def _cutoff_of_buckets(buckets: Sequence[str], n: int, cfg: MineConfig) -> pd.Timestamp:
    """:func:`_cutoff` of the times of ``n`` bucketed events, without holding them."""
    if cfg.test_after or not n:
        return _cutoff(np.zeros(0, np.int64) if not n else None, cfg)
    # numpy's quantile with method="lower" takes the floor of (n - 1) q
    k = int(np.floor((n - 1) * np.float64(1.0 - cfg.test_share)))
    return pd.Timestamp(_kth_time(buckets, k), tz="UTC")


def _note_part(names: pa.Array, partitions: int) -> np.ndarray:
    """(n,) the pair partition of each note id: a hash of the id, the same in every bucket."""
    return pd.util.hash_array(names.to_numpy(zero_copy_only=False)) % np.uint64(partitions)


# spilled pair tables are Arrow IPC files with LZ4 buffers: several times faster to write and
# read back than Parquet, a little larger on disk
_SPILL = pa.ipc.IpcWriteOptions(compression="lz4")


def _spill_writer(path: str, schema: pa.Schema) -> pa.ipc.RecordBatchFileWriter:
    return pa.ipc.new_file(path, schema, options=_SPILL)


def _write_spill(table: pa.Table, path: str) -> None:
    with _spill_writer(path, table.schema) as w:
        w.write_table(table)


def _read_spill(path: str) -> pa.Table:
    with pa.OSFile(path) as f:
        return pa.ipc.open_file(f).read_all()


def _seen(n: int, *codes: np.ndarray) -> np.ndarray:
    """(n,) bool: which of 0..n-1 occur in ``codes`` (a distinct count without sorting)."""
    seen = np.zeros(n, bool)
    for c in codes:
        seen[c] = True
    return seen


class _Partial:
    """Directed scores of disjoint user sets, summed and selected at :meth:`select` one
    partition of notes at a time; counts as in _mine.

    :meth:`add` writes each bucket's directed pair scores to Parquet files under ``tmp``, one per
    partition of note ids (a hash of the id): a pair goes to the partitions of both its notes.
    A partition so holds every partial score of every pair touching its notes, in bucket order,
    so it sums them (as the in-memory concatenation would) and ranks its notes' partners alone.
    Peak memory is then about one bucket or one partition, not the whole pair table; pass as
    many partitions as user buckets to keep a partition near a bucket's size."""

    def __init__(self, tmp: str, partitions: int) -> None:
        self.tmp, self.partitions = tmp, max(1, partitions)
        self.writers: dict[int, pq.ParquetWriter] = {}
        self.counts = {"events": 0, "clicks": 0, "views": 0, "users": 0}

    def _path(self, p: int, stage: str = "raw") -> str:
        return os.path.join(self.tmp, f"{stage}-{p}.arrow")

    def add(self, ev: pd.DataFrame, cfg: MineConfig) -> None:
        clicks = int(ev["click"].sum())
        for k, v in (("events", len(ev)), ("clicks", clicks), ("views", len(ev) - clicks),
                     ("users", int(ev["user_id"].nunique()))):
            self.counts[k] += v
        if not len(ev):
            return
        ids, a, b, score, users = _score_codes(ev, cfg.window_s, _support(cfg))
        names = pa.array(ids.astype(str).to_numpy(object), pa.string())
        part = _note_part(names, self.partitions).astype(np.int64)
        pa_, pb_ = part[a], part[b]
        other = np.flatnonzero(pb_ != pa_)
        rows, dest = np.r_[np.arange(len(a)), other], np.r_[pa_, pb_[other]]
        # rows keep the bucket's (a, b) order inside each partition, so both partitions of a
        # pair sum its partial scores in the same order and agree to the last bit
        order = np.lexsort((rows, dest))
        rows, dest = rows[order], dest[order]
        cols = {"query_id": names.take(pa.array(a[rows])),
                "target_id": names.take(pa.array(b[rows])),
                "score": pa.array(score[rows], pa.float64()),
                "query_part": pa.array(pa_[rows], pa.int32()),  # so no partition hashes again
                "target_part": pa.array(pb_[rows], pa.int32())}
        if users is not None:
            cols["users"] = pa.array(users[rows], pa.int64())
        table = pa.table(cols)
        starts = np.flatnonzero(np.r_[True, dest[1:] != dest[:-1]])
        for s, e in zip(starts, np.r_[starts[1:], len(dest)], strict=True):
            p = int(dest[s])
            if p not in self.writers:
                self.writers[p] = _spill_writer(self._path(p), table.schema)
            self.writers[p].write_table(table.slice(s, e - s))

    def _summed(self, p: int, cfg: MineConfig) -> tuple[pa.Array, np.ndarray, np.ndarray,
                                                        np.ndarray, np.ndarray | None,
                                                        np.ndarray]:
        """Partition p's pairs summed: (ids, q, t, score, users, part) with q, t codes into the
        sorted ``ids`` (rows sorted by (q, t); q < t when symmetric), users None unless
        ``cfg.min_users`` > 1, part (n_ids,) int64: each note's partition (p: its own).

        The first call sums the raw partial scores and keeps the result on disk, coded; later
        calls read that back."""
        if os.path.exists(self._path(p, "sum")):
            table = _read_spill(self._path(p, "sum"))
            notes = _read_spill(self._path(p, "ids"))
            users = table["users"].to_numpy() if "users" in table.column_names else None
            return (notes["id"].combine_chunks(), table["q"].to_numpy(), table["t"].to_numpy(),
                    table["score"].to_numpy(), users, notes["part"].to_numpy())
        table = _read_spill(self._path(p))
        q_ids, t_ids = table["query_id"], table["target_id"]
        ids = pc.unique(pa.chunked_array(q_ids.chunks + t_ids.chunks, pa.string()))
        ids = ids.take(pc.sort_indices(ids))  # UTF-8 byte order = code point order
        a = pc.index_in(q_ids, value_set=ids).to_numpy().astype(np.int64)
        b = pc.index_in(t_ids, value_set=ids).to_numpy().astype(np.int64)
        part = np.empty(len(ids), np.int64)
        part[a] = table["query_part"].to_numpy()
        part[b] = table["target_part"].to_numpy()
        score = table["score"].to_numpy()
        users = table["users"].to_numpy() if "users" in table.column_names else None
        del table, q_ids, t_ids
        n = np.int64(max(len(ids), 1))
        q, t = (np.minimum(a, b), np.maximum(a, b)) if cfg.symmetric else (a, b)
        del a, b
        key, score, users = _group_sum(q * n + t, score, users if cfg.min_users > 1 else None)
        q, t = key // n, key % n
        cols = {"q": pa.array(q), "t": pa.array(t), "score": pa.array(score, pa.float64())}
        if users is not None:
            cols["users"] = pa.array(users, pa.int64())
        _write_spill(pa.table(cols), self._path(p, "sum"))
        _write_spill(pa.table({"id": ids, "part": pa.array(part)}), self._path(p, "ids"))
        os.remove(self._path(p))
        return ids, q, t, score, users, part

    def select(self, cfg: MineConfig, drop_notes: pa.Array | None = None
               ) -> tuple[pd.DataFrame, dict, int]:
        """:func:`_select_codes` over all partitions: the same pairs and stats, and the number of
        selected pairs removed because they touch a note in ``drop_notes`` (string ids, for the
        time split's test notes: removed here, partition by partition, they are never held)."""
        for w in self.writers.values():
            w.close()
        parts, self.writers = sorted(self.writers), {}
        if not parts:
            pairs, stats = _mine(_prepare(pd.DataFrame(columns=EVENT_COLUMNS)), cfg)
            return pairs, {**self.counts, **{k: v for k, v in stats.items()
                                             if k not in self.counts}}, 0
        # pass 1: sum each partition (kept on disk, summed), count pairs (each in its query
        # note's partition) and notes (each in its own partition) for the min_users coverage
        scored = kept_pairs = notes_any = notes_kept = 0
        for p in parts:
            _, q, t, _, users, part = self._summed(p, cfg)
            own = part == p
            scored += int(own[q].sum())
            notes_any += int((own & _seen(len(part), q, t)).sum())
            if users is not None:
                keep = users >= cfg.min_users
                kept_pairs += int((own[q] & keep).sum())
                notes_kept += int((own & _seen(len(part), q[keep], t[keep])).sum())
        log.info("%d pair partitions summed: %d scored pairs", len(parts), scored)
        stats: dict = {"scored_pairs": scored}
        applied = False
        if cfg.min_users > 1:
            applied = notes_kept >= MIN_USERS_COVERAGE * notes_any
            stats["min_users"] = {"threshold": cfg.min_users, "pairs_kept": kept_pairs,
                                  "notes_with_pairs": notes_any, "notes_kept": notes_kept,
                                  "applied": applied}
            if not applied:
                log.warning("mine.min_users=%d would leave %d of %d notes with a pair (%d of %d "
                            "pairs), under %.0f %%: too sparse for a support threshold, so every "
                            "pair is kept", cfg.min_users, notes_kept, notes_any, kept_pairs,
                            scored, 100 * MIN_USERS_COVERAGE)

        def supported(p: int) -> tuple:
            ids, q, t, s, users, part = self._summed(p, cfg)
            if applied:
                keep = users >= cfg.min_users
                q, t, s = q[keep], t[keep], s[keep]
            return ids, q, t, s, part

        stats["after_min_users"] = kept_pairs if applied else scored
        lo_q, hi_q = cfg.min_score_quantile, cfg.max_score_quantile
        bounds = None
        if stats["after_min_users"] and (lo_q > 0.0 or hi_q < 1.0):
            # the one table that grows with the pairs: their scores, 8 bytes a pair
            scores = []
            for p in parts:
                _, q, _, s, part = supported(p)
                scores.append(s[part[q] == p])
            bounds = np.quantile(np.concatenate(scores), [lo_q, hi_q])
            del scores
            stats["score_bounds"] = [float(bounds[0]), float(bounds[1])]
        # pass 2: drop, then rank the partners of this partition's notes; a pair kept goes to
        # the partition of its query note, where pass 3 meets it again if both notes kept it
        inside_n, kept = 0, {}
        try:
            for p in parts:
                ids, q, t, s, part = supported(p)
                if bounds is not None:
                    inside = (s >= bounds[0]) & (s <= bounds[1])
                    q, t, s = q[inside], t[inside], s[inside]
                own = part == p
                inside_n += int(own[q].sum())
                mine_q, mine_t = np.flatnonzero(own[q]), np.flatnonzero(own[t])
                if cfg.symmetric:
                    # as _select_codes: [t-ends, q-ends] list every note's partners ascending
                    rows = np.r_[mine_t, mine_q]
                    top = rows[_top_k(np.r_[t[mine_t], q[mine_q]], s[rows], cfg.top_k)]
                else:
                    top = mine_q[_top_k(q[mine_q], s[mine_q], cfg.top_k)]
                top = np.flatnonzero(_seen(len(q), top))  # once each, ascending
                dest = part[q[top]].astype(np.int64)
                top = top[np.argsort(dest, kind="stable")]
                dest = np.sort(dest)
                table = pa.table({"query_id": ids.take(pa.array(q[top])),
                                  "target_id": ids.take(pa.array(t[top])),
                                  "score": pa.array(s[top], pa.float64())})
                starts = np.flatnonzero(np.r_[True, dest[1:] != dest[:-1]])
                for a, e in zip(starts, np.r_[starts[1:], len(dest)], strict=True) if len(dest) \
                        else ():
                    d = int(dest[a])
                    if d not in kept:
                        kept[d] = _spill_writer(self._path(d, "kept"), table.schema)
                    kept[d].write_table(table.slice(a, e - a))
                os.remove(self._path(p, "sum"))
                os.remove(self._path(p, "ids"))
        finally:
            for w in kept.values():
                w.close()
        stats["after_outlier_drop"] = inside_n
        # pass 3: each partition's kept pairs by query note, a pair kept by both its notes twice
        # (with the same score: both partitions summed it alike) and so deduplicated here
        out, n_kept, removed = [], 0, 0
        for p in sorted(kept):
            table = _read_spill(self._path(p, "kept"))
            os.remove(self._path(p, "kept"))
            table = table.take(pc.sort_indices(table, [("query_id", "ascending"),
                                                       ("target_id", "ascending")]))
            qs, ts = table["query_id"], table["target_id"]
            if len(table) > 1:
                same = pc.and_(pc.equal(qs.slice(1), qs.slice(0, len(table) - 1)),
                               pc.equal(ts.slice(1), ts.slice(0, len(table) - 1)))
                table = table.filter(pa.array(np.r_[True, ~same.to_numpy(zero_copy_only=False)]))
            n_kept += len(table)
            if drop_notes is not None and len(table):
                touching = pc.or_(pc.is_in(table["query_id"], value_set=drop_notes),
                                  pc.is_in(table["target_id"], value_set=drop_notes))
                removed += int(pc.sum(touching).as_py() or 0)
                table = table.filter(pc.invert(touching))
            out.append(table)
        stats["after_top_k"] = n_kept
        log.info("%d pairs selected in %d pair partitions, %d removed touching dropped notes",
                 n_kept, len(parts), removed)
        table = pa.concat_tables(out) if out else pa.table(
            {"query_id": pa.array([], pa.string()), "target_id": pa.array([], pa.string()),
             "score": pa.array([], pa.float64())})
        del out
        table = table.take(pc.sort_indices(table, [("query_id", "ascending"),
                                                   ("target_id", "ascending")]))
        pairs = pd.DataFrame({"query_id": table["query_id"].to_pandas(),
                              "target_id": table["target_id"].to_pandas(),
                              "score": table["score"].to_numpy()})
        return pairs, {**self.counts, **{k: v for k, v in stats.items()
                                         if k not in self.counts}}, removed


def mine_pairs_files(paths: Sequence[str], cfg: MineConfig, partitions: int = 16,
                     batch_rows: int = 1 << 20) -> pd.DataFrame:
    """:func:`mine_pairs` over event files too large to hold at once.

    One pass writes every batch's rows to ``partitions`` temporary Parquet buckets by a hash of
    user_id, so each user (and so N_u) lies whole in one bucket; each bucket is then scored in
    memory and its partial directed scores (and distinct-user counts, for ``cfg.min_users``)
    written to ``partitions`` pair partitions by a hash of each of their notes; each partition
    is then summed and its notes' partners ranked alone (:class:`_Partial`). Peak memory is
    about one bucket or one pair partition.
    """
    with tempfile.TemporaryDirectory(prefix="mine-pairs-") as tmp:
        os.mkdir(os.path.join(tmp, "pairs"))
        partial = _Partial(os.path.join(tmp, "pairs"), partitions)
        for bucket in _bucket(paths, tmp, partitions, batch_rows)["buckets"]:
            partial.add(pq.read_table(bucket).to_pandas(), cfg)
        return partial.select(cfg)[0]


# -- the same scoring as SQL, for a warehouse engine -------------------------------------------


def warehouse_sql(cfg: MineConfig, events: str = "events") -> str:
    """pairs.sql rendered for ``cfg``: the pairs of :func:`mine_pairs` from the table or view
    ``events`` (user_id, note_id, event, t as epoch microseconds). Scores may differ from the
    Python engine's in the last bit (another summing order)."""
    with open(os.path.join(os.path.dirname(__file__), "pairs.sql"), encoding="utf-8") as f:
        template = f.read()
    # comments out (they may hold braces); no string literal in it holds "--"
    sql = "\n".join(line.split("--")[0].rstrip() for line in template.splitlines())
    sql = "\n".join(line for line in sql.splitlines() if line)
    return sql.format(events=events, window_us=round(cfg.window_s * 1e6),
                      symmetric="TRUE" if cfg.symmetric else "FALSE", min_users=cfg.min_users,
                      min_users_coverage=repr(float(MIN_USERS_COVERAGE)),
                      min_score_quantile=repr(float(cfg.min_score_quantile)),
                      max_score_quantile=repr(float(cfg.max_score_quantile)), top_k=cfg.top_k)


# -- splits --------------------------------------------------------------------------------------


def _ids(col: pd.Series) -> pa.Array:
    return pa.array(col).cast(pa.large_string())


def _notes(pairs: pd.DataFrame) -> pa.Array:
    """Distinct note ids of a pair frame, sorted."""
    ids = pc.unique(pa.chunked_array([_ids(pairs["query_id"]), _ids(pairs["target_id"])],
                                     pa.large_string()))
    return ids.take(pc.sort_indices(ids))


def _touching(pairs: pd.DataFrame, notes: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(query in notes, target in notes), each (n_pairs,) bool."""
    return tuple(pc.is_in(_ids(pairs[c]), value_set=notes).to_numpy(zero_copy_only=False)
                 for c in ("query_id", "target_id"))


def assert_no_leak(train: pd.DataFrame, test: pd.DataFrame) -> None:
    """Raise :class:`DataError` naming a note found in both the train and the test pairs."""
    train_notes = _notes(train)
    shared = train_notes.filter(pc.is_in(train_notes, value_set=_notes(test)))
    if len(shared):
        raise DataError(f"note {shared[0].as_py()!r} appears in both train and test pairs "
                        f"({len(shared)} shared note(s)); test notes must be unseen in training")


def _hold_out(pairs: pd.DataFrame, share: float, rng: np.random.Generator
              ) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(rest, held, mixed): a seeded ``share`` of the notes is held out; ``held`` has the pairs
    with both notes held out, ``rest`` those with neither; ``mixed`` counts the pairs dropped."""
    notes = _notes(pairs)
    group = notes.take(pa.array(rng.permutation(len(notes))[:round(share * len(notes))]))
    in_q, in_t = _touching(pairs, group)
    held, rest = pairs[in_q & in_t], pairs[~in_q & ~in_t]
    return rest.reset_index(drop=True), held.reset_index(drop=True), int((in_q != in_t).sum())


def _cutoff(t: np.ndarray, cfg: MineConfig) -> pd.Timestamp:
    if cfg.test_after:
        cut = pd.Timestamp(cfg.test_after)
        return cut.tz_localize("UTC") if cut.tz is None else cut.tz_convert("UTC")
    return pd.Timestamp(int(np.quantile(t, 1.0 - cfg.test_share, method="lower")), tz="UTC")


def split_pairs(pairs: pd.DataFrame | None, events: pd.DataFrame, cfg: MineConfig
                ) -> tuple[dict[str, pd.DataFrame], dict]:
    """Split mined pairs into train/val/test so that no test note appears in a train pair.

    ``time``: pairs are mined separately from the events before the cut-off (train + val) and
    from those at or after it (test; ``pairs`` is not used and may be None). Sessions that
    straddle the cut-off are cut. Train pairs touching a test note are then removed.
    ``note``: a seeded ``test_share`` of the notes in ``pairs`` are test notes; a pair is test
    when both its notes are, train when neither is, and dropped when mixed.
    ``none``: every pair is train; test is empty.
    Val is then a seeded ``val_share`` of the remaining train pairs: pair-disjoint from train,
    not note-disjoint — it watches the training loss on unseen pairs; the guarantee that
    matters, no test note in any train pair, is asserted.
    Returns ({"train", "val", "test"}: pair frames, split_info with counts of all removals).
    """
    if pairs is None and cfg.split != "time":
        raise ValueError(f"split {cfg.split!r} splits mined pairs; pass them")
    rng = np.random.default_rng(cfg.seed)
    info: dict = {"method": cfg.split, "cutoff": None, "removed": {}}
    empty = pd.DataFrame({"query_id": pd.Series(dtype=str), "target_id": pd.Series(dtype=str),
                          "score": pd.Series(dtype=np.float64)})
    if cfg.split == "time":
        ev = _prepare(events)
        cut = _cutoff(ev["t"].to_numpy(), cfg)
        after = ev["t"].to_numpy() >= cut.value
        train, info["mining_before"] = _mine(ev[~after], cfg)
        test, info["mining_after"] = _mine(ev[after], cfg)
        info["cutoff"], info["events"] = cut.isoformat(), {"before": int((~after).sum()),
                                                           "after": int(after.sum())}
    elif cfg.split == "note":
        train, test, info["removed"]["test_mixed"] = _hold_out(pairs, cfg.test_share, rng)
    else:
        train, test = pairs, empty
    return _finish_split(train, test, info, rng, cfg)


def _finish_split(train: pd.DataFrame, test: pd.DataFrame, info: dict, rng: np.random.Generator,
                  cfg: MineConfig, test_notes: pa.Array | None = None
                  ) -> tuple[dict[str, pd.DataFrame], dict]:
    """The tail of :func:`split_pairs` once train and test pairs are known: drop train pairs
    touching a test note, hold out val, assert no leak, count. ``test_notes``: ``_notes(test)``
    when the caller has it."""
    in_q, in_t = _touching(train, _notes(test) if test_notes is None else test_notes)
    touching = in_q | in_t
    del in_q, in_t
    info["removed"]["train_touching_test"] = int(touching.sum())
    if touching.any():  # no copy of the train pairs when none goes
        train = train[~touching].reset_index(drop=True)
    del touching
    held = np.zeros(len(train), dtype=bool)
    held[rng.permutation(len(train))[:round(cfg.val_share * len(train))]] = True
    train, val = train[~held].reset_index(drop=True), train[held].reset_index(drop=True)
    splits = {"train": train, "val": val, "test": test.reset_index(drop=True)}
    assert_no_leak(splits["train"], splits["test"])
    info["pairs"] = {k: len(v) for k, v in splits.items()}
    info["notes"] = {k: len(_notes(v)) for k, v in splits.items()}
    return splits, info


# -- step ----------------------------------------------------------------------------------------


def _quantiles(scores: pd.Series) -> dict[str, float]:
    if not len(scores):
        return {}
    return {f"q{round(q * 100)}": float(v)
            for q, v in zip(_QUANTILES, np.quantile(scores, _QUANTILES), strict=True)}


def run(events_uri: str, out_dir: str, cfg: MineConfig,
        notes_ids: Collection[str] | None = None) -> dict:
    """Mine and split pairs from one events file (Parquet, CSV or JSONL; local or gs://).

    Writes pairs_{train,val,test}.parquet (query_id, target_id, score) and mining.json under
    ``out_dir``; returns the summary written to mining.json. Events naming a note outside
    ``notes_ids`` (when given) are dropped and counted.
    """
    return _mine_file(events_uri, out_dir, cfg, notes_ids)[0]


# a CSV/JSONL event row is at least this long ("u1,n1,view,2024-05-01T12:00:00Z" is 33 bytes;
# real ids and offsets make it longer), so size / this over-counts rows: the safe side
_MIN_ROW_BYTES = 48


def count_events(uri: str, ext: str) -> int:
    """Events in a file, without reading the data: Parquet's footer row count; for CSV/JSONL the
    file size over ``_MIN_ROW_BYTES`` (an over-estimate)."""
    if ext == "parquet":
        with storage.local_copy(uri) as local:
            return pq.ParquetFile(local).metadata.num_rows
    if storage.is_gcs(uri):
        blob = storage._bucket_blob(uri)
        blob.reload()
        size = int(blob.size)
    else:
        size = os.path.getsize(uri)
    return -(-size // _MIN_ROW_BYTES)


def _mine_streamed(events_uri: str, n_events: int, cfg: MineConfig,
                   notes_ids: Collection[str] | None, batch_rows: int = 1 << 20
                   ) -> tuple[dict[str, pd.DataFrame], dict, int, int]:
    """:func:`split_pairs` of :func:`mine_pairs` without holding the events or the pair table:
    events stream into user buckets on local disk (each about half
    ``cfg.in_memory_max_events``), each bucket is scored alone and its partial pair scores go to
    as many pair partitions by note, each then summed and ranked alone (:class:`_Partial`). The
    time split's cut-off is found by passes over the buckets' times. Returns (splits, info,
    events read, events dropped); the same pairs and info as the in-memory path."""
    partitions = max(2, -(-2 * n_events // cfg.in_memory_max_events))
    rng = np.random.default_rng(cfg.seed)
    info: dict = {"method": cfg.split, "cutoff": None, "removed": {}}
    with tempfile.TemporaryDirectory(prefix="mine-pairs-") as tmp:
        b = _bucket([events_uri], tmp, partitions, min(batch_rows, cfg.in_memory_max_events),
                    notes_ids)
        log.info("%d events in %d user buckets", b["read"] - b["dropped"], len(b["buckets"]))
        cut = None
        if cfg.split == "time":
            cut = _cutoff_of_buckets(b["buckets"], b["read"] - b["dropped"], cfg)
        names = ("before", "after") if cut is not None else ("all",)
        for name in names:
            os.mkdir(os.path.join(tmp, name))
        parts = {name: _Partial(os.path.join(tmp, name), partitions) for name in names}
        for i, bucket in enumerate(b["buckets"]):
            if i and i % 10 == 0:
                log.info("%d of %d user buckets scored", i, len(b["buckets"]))
            ev = pq.read_table(bucket).to_pandas()
            if cut is None:
                parts["all"].add(ev, cfg)
            else:
                after = ev["t"].to_numpy() >= cut.value
                parts["before"].add(ev[~after], cfg)
                parts["after"].add(ev[after], cfg)
            del ev
            os.remove(bucket)
        log.info("%d user buckets scored into %d pair partitions", len(b["buckets"]), partitions)
        if cut is not None:
            # test pairs first: train pairs touching their notes are then removed as they are
            # selected, so the train pairs are never held whole (the in-memory split removes
            # them after selection: the same pairs and counts)
            info["cutoff"], info["mining_before"] = cut.isoformat(), None  # the in-memory order
            test, info["mining_after"], _ = parts["after"].select(cfg)
            info["events"] = None
            test_notes = _notes(test)
            touching = [0]

            def train() -> pd.DataFrame:  # no name here holds the train pairs during the split
                pairs, info["mining_before"], touching[0] = parts["before"].select(
                    cfg, test_notes.cast(pa.string()))
                return pairs

            splits, info = _finish_split(train(), test, info, rng, cfg, test_notes)
            del test, test_notes
            info["removed"]["train_touching_test"] += touching[0]
        else:
            pairs = parts["all"].select(cfg)[0]
    if cut is not None:
        info["events"] = {"before": info["mining_before"]["events"],
                          "after": info["mining_after"]["events"]}
    else:
        splits, info = split_pairs(pairs, pd.DataFrame(columns=EVENT_COLUMNS), cfg)
    return splits, info, b["read"], b["dropped"]


def _mine_file(events_uri: str, out_dir: str, cfg: MineConfig,
               notes_ids: Collection[str] | None) -> tuple[dict, dict[str, pd.DataFrame]]:
    """:func:`run`, also handing back the split frames it wrote."""
    file = storage.basename(events_uri)
    ext = file.rsplit(".", 1)[-1] if "." in file else ""
    if ext not in ("parquet", "csv", "jsonl"):
        raise DataError(f"{file}: expected an events .parquet, .csv or .jsonl file")
    n_events = count_events(events_uri, ext)
    engine = "in_memory" if n_events <= cfg.in_memory_max_events else "buckets"
    log.info("%s: about %d events, mined %s (mine.in_memory_max_events=%d)", file, n_events,
             "in memory" if engine == "in_memory" else "from user buckets on disk",
             cfg.in_memory_max_events)
    if engine == "in_memory":
        events = _read_events(events_uri, ext)
        log.info("read %d events from %s", len(events), events_uri)
        n_read, dropped = len(events), 0
        if notes_ids is not None:
            known = events["note_id"].isin(list(notes_ids))
            dropped = int((~known).sum())
            events = events[known]
        pairs = None if cfg.split == "time" else mine_pairs(events, cfg)
        splits, info = split_pairs(pairs, events, cfg)
        used = len(events)
    else:
        splits, info, n_read, dropped = _mine_streamed(events_uri, n_events, cfg, notes_ids)
        used = n_read - dropped
    if dropped:
        log.warning("%s: dropped %d event(s) naming notes not in the notes tables",
                    file, dropped)
    for name, frame in splits.items():
        write_table(frame[PAIR_COLUMNS], storage.join(out_dir, f"pairs_{name}.parquet"))
    summary = {"events_uri": events_uri, "config": asdict(cfg),
               "events": {"read": n_read, "dropped_unknown_notes": dropped, "used": used},
               "engine": {"name": engine, "events_estimated": n_events,
                          "in_memory_max_events": cfg.in_memory_max_events},
               "split": info, "pairs": info["pairs"],
               "score_quantiles": {k: _quantiles(v["score"]) for k, v in splits.items()}}
    storage.write_text(storage.join(out_dir, "mining.json"), json.dumps(summary, indent=2))
    log.info("mined pairs: %s (notes %s, removed %s)", info["pairs"], info["notes"],
             info["removed"])
    return summary, splits


def step(canonical_dir: str, out_dir: str, report_dir: str, cfg: MineConfig) -> dict:
    """The pipeline step: a canonical folder at ``out_dir`` whose train/val pairs are mined from
    the events of ``canonical_dir`` (mining.json and the raw splits go to ``report_dir``).

    Test pairs the data brings (``test`` and ``test_<slice>``) stay the evaluation set; mined
    test pairs stand in only when there are none. Train and val pairs touching any evaluated
    note are then removed, so no test note is trained on. Without events, or with
    ``use_events`` off, the folder passes through unchanged. Returns what was done.
    """
    notes, pairs, manifest = load_canonical(canonical_dir)
    if not cfg.use_events or manifest.get("events") is None:
        reason = "mine.use_events is off" if not cfg.use_events else "the data has no events"
        derive_canonical(canonical_dir, out_dir,
                         note={"mining": {"status": "skipped", "reason": reason}})
        log.info("pair mining skipped: %s; the given pairs are used", reason)
        return {"status": "skipped", "reason": reason}
    ids = set().union(*(set(df["note_id"]) for df in notes.values()))
    summary, mined = _mine_file(storage.join(canonical_dir, "events.parquet"), report_dir, cfg,
                                ids)
    mined = {k: v[PAIR_COLUMNS].reset_index(drop=True) for k, v in mined.items()}
    final = {k: v for k, v in pairs.items() if k == "test" or k.startswith("test_")}
    summary["test_pairs"] = "given" if "test" in final else "mined"
    final.setdefault("test", mined["test"])
    evaluated = pa.array(sorted(set().union(*(set(v["query_id"]) | set(v["target_id"])
                                              for v in final.values()))))
    for k in ("train", "val"):
        in_q, in_t = _touching(mined[k], evaluated)
        summary["split"]["removed"][f"{k}_touching_evaluated"] = int((in_q | in_t).sum())
        final[k] = mined[k][~(in_q | in_t)].reset_index(drop=True)
    assert_no_leak(final["train"], final["test"])
    for k in ("train", "val") if summary["test_pairs"] == "given" else ("train", "val", "test"):
        final[k] = final[k].assign(_file=f"events.parquet (mined {k} pairs)",
                                   _row=np.arange(1, len(final[k]) + 1))
    summary["pairs"] = {k: len(v) for k, v in final.items()}
    storage.write_text(storage.join(report_dir, "mining.json"), json.dumps(summary, indent=2))
    derive_canonical(canonical_dir, out_dir, pairs=final,
                     note={"mining": {"status": "mined", "pairs": summary["pairs"],
                                      "split": summary["split"]["method"],
                                      "cutoff": summary["split"]["cutoff"]}})
    log.info("training pairs mined from events: %s (test pairs %s)", summary["pairs"],
             summary["test_pairs"])
    return {"status": "mined", **summary}
