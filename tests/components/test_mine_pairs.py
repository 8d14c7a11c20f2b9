import json
import logging
import os
from collections import Counter, defaultdict
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from components.common.readers import read_table, write_table
from components.common.schema import DataError
from components.mine_pairs import run as mine_module
from components.mine_pairs.run import (
    MineConfig,
    assert_no_leak,
    mine_pairs,
    mine_pairs_files,
    run,
    score_pairs,
    select_pairs,
    split_pairs,
)

T0 = pd.Timestamp("2024-05-01T12:00:00Z")


def _log(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    """Events from (user, note, event, minutes after T0)."""
    df = pd.DataFrame(rows, columns=["user_id", "note_id", "event", "minute"])
    df["ts"] = T0 + pd.to_timedelta(df.pop("minute"), unit="min")
    return df


# Window 10 min. N_u = the user's click events: u1 2, u2 2, u3 3, u4 0.
#   u1 click C@5:   views A@0, B@2                      -> A→C, B→C   (+1/2 each)
#   u1 click B@20:  A@8 is 12 min earlier, C never seen -> nothing; A@8 is after click C@5
#   u2 click C@10:  A@0 (exactly 10 min: in), A@1 again (once per click), C@3 is C itself
#                                                       -> A→C        (+1/2)
#   u2 click D@11:  A@1 (exactly 10 min: in), C@3; A@0 is 11 min earlier
#                                                       -> A→D, C→D   (+1/2 each)
#   u3 click C@4:   B@0, A@4 (same instant: in)         -> B→C, A→C   (+1/3 each)
#   u3 click B@31:  C@30                                -> C→B        (+1/3)
#   u3 click A@100: no view within 10 min               -> nothing, but counts in N_u3
#   u4 only views.
HAND = _log([
    ("u1", "A", "view", 0), ("u1", "B", "view", 2), ("u1", "C", "click", 5),
    ("u1", "A", "view", 8), ("u1", "B", "click", 20),
    ("u2", "A", "view", 0), ("u2", "A", "view", 1), ("u2", "C", "view", 3),
    ("u2", "C", "click", 10), ("u2", "D", "click", 11),
    ("u3", "B", "view", 0), ("u3", "A", "view", 4), ("u3", "C", "click", 4),
    ("u3", "C", "view", 30), ("u3", "B", "click", 31), ("u3", "A", "click", 100),
    ("u4", "D", "view", 0),
])
# directed totals
HAND_DIRECTED = {
    ("A", "C"): Fraction(1, 2) + Fraction(1, 2) + Fraction(1, 3),  # 4/3
    ("B", "C"): Fraction(1, 2) + Fraction(1, 3),  # 5/6
    ("A", "D"): Fraction(1, 2),
    ("C", "D"): Fraction(1, 2),
    ("C", "B"): Fraction(1, 3),
}
# undirected: {A,C} 4/3, {B,C} 5/6 + 1/3 = 7/6, {A,D} 1/2, {C,D} 1/2
HAND_SYMMETRIC = {("A", "C"): Fraction(4, 3), ("B", "C"): Fraction(7, 6),
                  ("A", "D"): Fraction(1, 2), ("C", "D"): Fraction(1, 2)}


def _as_dict(pairs: pd.DataFrame) -> dict[tuple[str, str], float]:
    return {(q, t): s for q, t, s in zip(pairs["query_id"], pairs["target_id"], pairs["score"],
                                         strict=True)}


def _approx(expected: dict) -> dict:
    return {k: pytest.approx(float(v), abs=1e-12) for k, v in expected.items()}


def test_directed_scores_match_hand_computation():
    got = score_pairs(HAND, window_s=600)
    assert list(got.columns) == ["query_id", "target_id", "score"]
    assert got["score"].dtype == np.float64
    assert _as_dict(got) == _approx(HAND_DIRECTED)


def test_window_edge_is_inclusive():
    # just under 10 min: u2's view A@1 no longer reaches click D@11, and A@0 no longer reaches
    # click C@10 (A@1 still does, so A→C keeps its 1/2)
    narrower = {k: v for k, v in HAND_DIRECTED.items() if k != ("A", "D")}
    assert _as_dict(score_pairs(HAND, window_s=599.999)) == _approx(narrower)


def test_directed_top_k_breaks_ties_by_partner_id():
    got = mine_pairs(HAND, MineConfig(window_s=600, symmetric=False, top_k=1, min_users=1))
    # A: C 4/3 > D 1/2; B: C only; C: D 1/2 > B 1/3
    assert _as_dict(got) == _approx({("A", "C"): Fraction(4, 3), ("B", "C"): Fraction(5, 6),
                                     ("C", "D"): Fraction(1, 2)})


def test_symmetric_pairs_are_undirected_and_top_k_counts_both_ends():
    everything = mine_pairs(HAND, MineConfig(window_s=600, top_k=10, min_users=1))
    assert _as_dict(everything) == _approx(HAND_SYMMETRIC)
    assert (everything["query_id"] < everything["target_id"]).all()
    # top-1: A keeps C (4/3), B keeps C (7/6), C keeps A (4/3), D ties A and C at 1/2 and keeps
    # A (smaller id); nobody keeps {C,D}
    top1 = mine_pairs(HAND, MineConfig(window_s=600, top_k=1, min_users=1))
    assert _as_dict(top1) == _approx({k: HAND_SYMMETRIC[k] for k in
                                      [("A", "C"), ("A", "D"), ("B", "C")]})


def test_quantile_drop():
    # undirected scores sorted: 1/2, 1/2, 7/6, 4/3. The 0.75 quantile (linear) is
    # 7/6 + 0.25 * (4/3 - 7/6) = 29/24 < 4/3, so {A,C} goes; the 0.5 quantile is 5/6, so both
    # 1/2 pairs go.
    high = mine_pairs(HAND, MineConfig(window_s=600, max_score_quantile=0.75, min_users=1))
    assert set(_as_dict(high)) == {("B", "C"), ("A", "D"), ("C", "D")}
    low = mine_pairs(HAND, MineConfig(window_s=600, min_score_quantile=0.5, min_users=1))
    assert set(_as_dict(low)) == {("A", "C"), ("B", "C")}


def _random_log(seed: int) -> pd.DataFrame:
    """Integer minutes (many ties and window edges); each user's click count a power of two, so
    float scores are exact and ties are true ties."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(8):
        kinds = ["click"] * int(rng.choice([1, 2, 4, 8])) + ["view"] * int(rng.integers(2, 16))
        rows += [(f"u{u}", f"n{rng.integers(0, 7)}", kind, int(rng.integers(0, 90)))
                 for kind in kinds]
    return _log(rows)


def _reference(events: pd.DataFrame, window_s: float, top_k: int, symmetric: bool,
               min_users: int = 1) -> dict:
    """The definition, written out with loops and exact fractions."""
    rows = list(zip(events["user_id"], events["note_id"], events["event"], events["ts"],
                    strict=True))
    n_clicks = Counter(u for u, _, e, _ in rows if e == "click")
    score: dict = defaultdict(Fraction)
    users: dict = defaultdict(set)  # the distinct users behind each (un)directed pair
    for u, b, e, tc in rows:
        if e == "click":
            window = pd.Timedelta(seconds=window_s)
            for a in {a for v, a, e2, tv in rows
                      if v == u and e2 == "view" and a != b and tc - window <= tv <= tc}:
                score[(a, b)] += Fraction(1, n_clicks[u])
                users[(min(a, b), max(a, b)) if symmetric else (a, b)].add(u)
    if symmetric:
        undirected: dict = defaultdict(Fraction)
        for (a, b), s in score.items():
            undirected[min(a, b), max(a, b)] += s
        score = undirected
    score = {k: s for k, s in score.items() if len(users[k]) >= min_users}
    partners = defaultdict(list)
    for (q, t), s in score.items():
        partners[q].append((-s, t, (q, t)))
        if symmetric:
            partners[t].append((-s, q, (q, t)))
    return {key: score[key] for lst in partners.values() for _, _, key in sorted(lst)[:top_k]}


@pytest.mark.parametrize("min_users", [1, 2, 3])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_definition_on_random_logs(seed, symmetric, min_users, monkeypatch):
    monkeypatch.setattr(mine_module, "MIN_USERS_COVERAGE", 0.0)  # the threshold always applies
    events = _random_log(seed)
    cfg = MineConfig(window_s=1800, top_k=2, symmetric=symmetric, min_users=min_users)
    expected = _reference(events, cfg.window_s, cfg.top_k, symmetric, min_users)
    assert expected
    assert _as_dict(mine_pairs(events, cfg)) == _approx(expected)
    # every scored pair (no top-k): the threshold bites on these logs
    every = _reference(events, cfg.window_s, 10**6, symmetric, min_users)
    if min_users > 1:
        assert len(every) < len(_reference(events, cfg.window_s, 10**6, symmetric))
    assert _as_dict(mine_pairs(events, replace(cfg, top_k=10**6))) == _approx(every)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("min_users", [1, 2, 3])
def test_file_path_matches_in_memory(tmp_path, min_users, symmetric, monkeypatch):
    monkeypatch.setattr(mine_module, "MIN_USERS_COVERAGE", 0.0)
    events = pd.concat([_random_log(3), _random_log(4).assign(user_id=lambda d: d.user_id + "x")],
                       ignore_index=True)
    half = len(events) // 2
    events.iloc[:half].to_parquet(tmp_path / "a.parquet", index=False)
    events.iloc[half:].assign(ts=lambda d: d.ts.map(pd.Timestamp.isoformat)).to_csv(
        tmp_path / "b.csv", index=False)
    cfg = MineConfig(window_s=1800, top_k=3, min_users=min_users, symmetric=symmetric)
    got = mine_pairs_files([str(tmp_path / "a.parquet"), str(tmp_path / "b.csv")], cfg,
                           partitions=3, batch_rows=17)
    expected = mine_pairs(events, cfg)
    assert len(expected) and _as_dict(got) == _approx(_as_dict(expected))
    every = replace(cfg, top_k=10**6)
    got = mine_pairs_files([str(tmp_path / "a.parquet"), str(tmp_path / "b.csv")], every,
                           partitions=3, batch_rows=17)
    expected = mine_pairs(events, every)
    assert _as_dict(got) == _approx(_as_dict(expected))
    if min_users > 1:  # the threshold bites
        assert len(expected) < len(mine_pairs(events, replace(every, min_users=1)))


# -- support threshold (mine.min_users) ----------------------------------------------------------
# Distinct users per pair in HAND: {A,C} u1 u2 u3; {B,C} u1 (B→C), u3 (B→C and C→B: once);
# {A,D} u2; {C,D} u2. Directed: A→C 3, B→C 2, C→B 1, A→D 1, C→D 1.


@pytest.mark.parametrize(("symmetric", "min_users", "expected"), [
    (True, 2, {k: HAND_SYMMETRIC[k] for k in [("A", "C"), ("B", "C")]}),
    (True, 3, {("A", "C"): HAND_SYMMETRIC[("A", "C")]}),  # u3 counts once for {B,C}
    (False, 2, {k: HAND_DIRECTED[k] for k in [("A", "C"), ("B", "C")]}),
    (False, 3, {("A", "C"): HAND_DIRECTED[("A", "C")]}),
])
def test_min_users_hand_computed(symmetric, min_users, expected, monkeypatch):
    monkeypatch.setattr(mine_module, "MIN_USERS_COVERAGE", 0.0)  # at 3 only 2 of 4 notes stay
    cfg = MineConfig(window_s=600, symmetric=symmetric, min_users=min_users)
    assert _as_dict(mine_pairs(HAND, cfg)) == _approx(expected)


def test_min_users_drops_a_pair_from_one_user_however_strong(monkeypatch):
    monkeypatch.setattr(mine_module, "MIN_USERS_COVERAGE", 0.0)  # 2 of the 4 notes keep a pair
    # u1 produces X→Y three times (score 1 from one user); u2 and u3 each produce P→Q once
    # (score 1/2 + 1/2 = 1 from two users)
    events = _log([("u1", "X", "view", 0), ("u1", "Y", "click", 1), ("u1", "X", "view", 20),
                   ("u1", "Y", "click", 21), ("u1", "X", "view", 40), ("u1", "Y", "click", 41),
                   ("u2", "P", "view", 0), ("u2", "Q", "click", 1), ("u2", "Z", "click", 30),
                   ("u3", "P", "view", 0), ("u3", "Q", "click", 1), ("u3", "Z", "click", 30)])
    one = _as_dict(mine_pairs(events, MineConfig(window_s=600, min_users=1)))
    assert one == _approx({("P", "Q"): 1, ("X", "Y"): 1})
    two = mine_pairs(events, MineConfig(window_s=600, min_users=2))
    assert _as_dict(two) == _approx({("P", "Q"): 1})


def test_min_users_one_is_the_plain_miner():
    # threshold 1 counts no users and needs no counts: scores selected without a 'users' column
    # give the same frame bit for bit (the hand-computed and loop-reference tests above pin its
    # values); a threshold no pair falls under changes nothing either (counting users does not
    # touch the scores)
    events = pd.concat([_drifting_log(0), _drifting_log(1)], ignore_index=True)
    plain = mine_pairs(events, MineConfig(window_s=1800, min_users=1))
    scores = score_pairs(events, 1800)
    assert "users" not in scores.columns
    selected, stats = select_pairs(scores, MineConfig(window_s=1800, min_users=1))
    pd.testing.assert_frame_equal(selected, plain, check_exact=True)
    assert "min_users" not in stats and stats["after_min_users"] == stats["scored_pairs"]
    doubled = pd.concat([events, events.assign(user_id=events["user_id"] + "'")],
                        ignore_index=True)  # every pair now has at least two users
    pd.testing.assert_frame_equal(mine_pairs(doubled, MineConfig(window_s=1800, min_users=2)),
                                  mine_pairs(doubled, MineConfig(window_s=1800, min_users=1)),
                                  check_exact=True)


def test_min_users_falls_back_on_sparse_logs(caplog):
    # HAND at 2 keeps {A,C} and {B,C}: 3 of the 4 notes with a pair, the bar
    # (MIN_USERS_COVERAGE = 3/4), so it applies; at 3 only {A,C} would stay, 2 of 4 notes, so the
    # threshold is not applied (with a warning) and every pair is kept
    assert mine_module.MIN_USERS_COVERAGE == 0.75
    with caplog.at_level(logging.WARNING, logger=mine_module.__name__):
        got = mine_pairs(HAND, MineConfig(window_s=600, min_users=2))
    assert set(_as_dict(got)) == {("A", "C"), ("B", "C")} and not caplog.text
    with caplog.at_level(logging.WARNING, logger=mine_module.__name__):
        got = mine_pairs(HAND, MineConfig(window_s=600, min_users=3))
    pd.testing.assert_frame_equal(got, mine_pairs(HAND, MineConfig(window_s=600, min_users=1)),
                                  check_exact=True)
    assert "min_users=3 would leave 2 of 4 notes with a pair (1 of 4 pairs)" in caplog.text
    _, info = split_pairs(None, HAND, MineConfig(window_s=600, min_users=3,
                                                 test_after="2030-01-01"))
    assert info["mining_before"]["min_users"] == {"threshold": 3, "pairs_kept": 1,
                                                  "notes_with_pairs": 4, "notes_kept": 2,
                                                  "applied": False}
    assert info["mining_before"]["after_min_users"] == info["mining_before"]["scored_pairs"] == 4


def test_min_users_counts_alike_with_two_column_keys(monkeypatch):
    # huge logs count (user, pair) as two columns instead of one packed int64: same pairs
    events = pd.concat([_random_log(5), _random_log(6).assign(user_id=lambda d: d.user_id + "x")],
                       ignore_index=True)
    for symmetric in (True, False):
        cfg = MineConfig(window_s=1800, top_k=10**6, symmetric=symmetric, min_users=2)
        packed = mine_pairs(events, cfg)
        monkeypatch.setattr(mine_module, "_ONE_KEY_LIMIT", 0)
        pd.testing.assert_frame_equal(mine_pairs(events, cfg), packed, check_exact=True)
        monkeypatch.undo()
        assert len(packed) < len(mine_pairs(events, replace(cfg, min_users=1)))


def test_min_users_needs_user_counts():
    with pytest.raises(ValueError, match="'users' column"):
        select_pairs(score_pairs(HAND, 600), MineConfig(window_s=600, min_users=2))
    with pytest.raises(ValueError, match="min_users must be at least 1"):
        MineConfig(min_users=0)


def _drifting_log(seed: int = 0) -> pd.DataFrame:
    """Ten days of 8-event sessions; the notes in fashion drift day by day."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(300):
        start = rng.uniform(0, 10 * 24 * 60)
        for i in range(8):
            note = int(start // (24 * 60)) * 10 + int(rng.integers(0, 14))
            rows.append((f"u{rng.integers(0, 50)}" if i == 0 else rows[-1][0], f"n{note}",
                         "click" if rng.random() < 0.3 else "view", start + 2 * i))
    return _log(rows)


def _notes(pairs: pd.DataFrame) -> set[str]:
    return set(pairs["query_id"]) | set(pairs["target_id"])


def test_time_split_hand_computed():
    # before 12:25, N_u3 = 1 (click C@4), so train scores {A,C} 1/2+1/2+1 = 2, {B,C} 1/2+1 =
    # 3/2, {A,D} 1/2, {C,D} 1/2. After it u3 clicks B@31 and A@100 (N = 2): test {B,C} = 1/2.
    # Train pairs touching B or C are removed.
    cfg = MineConfig(window_s=600, test_after="2024-05-01T12:25:00", val_share=0.0,
                     min_users=1)
    splits, info = split_pairs(None, HAND, cfg)
    assert _as_dict(splits["test"]) == _approx({("B", "C"): Fraction(1, 2)})
    assert _as_dict(splits["train"]) == _approx({("A", "D"): Fraction(1, 2)})
    assert info["removed"]["train_touching_test"] == 3
    assert info["cutoff"] == "2024-05-01T12:25:00+00:00"
    assert info["events"] == {"before": 14, "after": 3}


@pytest.mark.parametrize("method", ["time", "note"])
def test_splits_leak_nothing(method):
    events = _drifting_log()
    cfg = MineConfig(window_s=1800, split=method, test_share=0.3, val_share=0.1)
    pairs = mine_pairs(events, cfg)
    splits, info = split_pairs(pairs, events, cfg)
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert len(train) and len(val) and len(test)
    assert not _notes(train) & _notes(test)
    assert not _notes(val) & _notes(test)
    pair_set = lambda df: set(zip(df["query_id"], df["target_id"], strict=True))  # noqa: E731
    assert not pair_set(train) & pair_set(val)
    assert_no_leak(train, test)
    assert info["pairs"] == {"train": len(train), "val": len(val), "test": len(test)}
    if method == "note":  # every mined pair is accounted for
        assert len(pairs) == len(train) + len(val) + len(test) + sum(info["removed"].values())
    else:
        cut = pd.Timestamp(info["cutoff"])
        assert info["events"]["after"] == int((events["ts"] >= cut).sum())


def test_assert_no_leak_names_the_note():
    train = pd.DataFrame({"query_id": ["a", "b"], "target_id": ["x", "y"], "score": [1.0, 1.0]})
    test = pd.DataFrame({"query_id": ["y"], "target_id": ["z"], "score": [1.0]})
    with pytest.raises(DataError, match="note 'y'"):
        assert_no_leak(train, test)


def test_same_seed_same_split():
    events = _drifting_log()
    cfg = MineConfig(window_s=1800, split="note", test_share=0.3, val_share=0.1, seed=7)
    pairs = mine_pairs(events, cfg)
    first, info = split_pairs(pairs, events, cfg)
    again, info_again = split_pairs(pairs, events, cfg)
    assert info == info_again
    for name in first:
        pd.testing.assert_frame_equal(first[name], again[name])
    other, _ = split_pairs(pairs, events, MineConfig(**{**cfg.__dict__, "seed": 8}))
    assert _notes(other["test"]) != _notes(first["test"])


def test_missing_column_names_file_and_field(tmp_path):
    path = str(tmp_path / "events.parquet")
    write_table(HAND.drop(columns="ts"), path)
    with pytest.raises(DataError, match=r"events\.parquet: missing column\(s\) 'ts'"):
        run(path, str(tmp_path / "out"), MineConfig())
    with pytest.raises(DataError, match="'event'"):
        mine_pairs(HAND.drop(columns="event"), MineConfig())


def test_unknown_event_names_file_row_across_batches(tmp_path):
    path = str(tmp_path / "events.parquet")
    bad = pd.concat([HAND] * 3, ignore_index=True)
    bad.loc[29, "event"] = "purchase"  # file row 30, in the second batch of 17
    write_table(bad, path)
    with pytest.raises(DataError, match=r"events\.parquet row 30, field 'event': unknown event "
                                        r"'purchase'"):
        mine_pairs_files([path], MineConfig(), batch_rows=17)


def test_run_writes_splits_and_summary(tmp_path):
    path = str(tmp_path / "events.parquet")
    events = _drifting_log()
    write_table(events, path)
    known = set(events["note_id"]) - {"n3"}
    out = str(tmp_path / "out")
    summary = run(path, out, MineConfig(window_s=1800, split="time", test_share=0.3),
                  notes_ids=known)
    assert summary["events"]["dropped_unknown_notes"] == int((events["note_id"] == "n3").sum()) > 0
    with open(os.path.join(out, "mining.json")) as f:
        assert json.load(f) == summary
    loaded = {name: read_table(os.path.join(out, f"pairs_{name}.parquet"))
              for name in ("train", "val", "test")}
    for name, frame in loaded.items():
        assert list(frame.columns) == ["query_id", "target_id", "score"]
        assert len(frame) == summary["pairs"][name]
        assert "n3" not in _notes(frame)
    assert not _notes(loaded["train"]) & _notes(loaded["test"])
    assert summary["score_quantiles"]["train"]["q100"] == loaded["train"]["score"].max()


def _canonical(tmp_path, with_events: bool) -> str:
    from components.common.readers import read_dataset, write_canonical
    from pipelines.demo_data import make_demo_data

    raw = str(tmp_path / "raw")
    make_demo_data(raw, notes=80, seed=1)
    ds = read_dataset(raw)
    if not with_events:
        ds.events = None
    out = str(tmp_path / "canon")
    write_canonical(ds, out)
    return out


def test_step_mines_training_pairs_and_keeps_the_given_test_pairs(tmp_path):
    from components.common.canonical import load_canonical
    from components.mine_pairs.run import step

    src = _canonical(tmp_path, with_events=True)
    done = step(src, str(tmp_path / "out"), str(tmp_path / "report"), MineConfig(val_share=0.2))
    assert done["status"] == "mined" and done["test_pairs"] == "given"
    _, before, _ = load_canonical(src)
    notes, after, manifest = load_canonical(str(tmp_path / "out"))
    assert manifest["mining"]["status"] == "mined" and manifest["mining"]["cutoff"]
    for name in before:  # the evaluation pairs travel unchanged
        if name.startswith("test"):
            pd.testing.assert_frame_equal(after[name], before[name])
    assert len(after["train"]) > 0 and (after["train"]["_file"].str.contains("mined")).all()
    evaluated = set().union(*(set(v["query_id"]) | set(v["target_id"])
                              for k, v in after.items() if k.startswith("test")))
    for k in ("train", "val"):
        assert not (set(after[k]["query_id"]) | set(after[k]["target_id"])) & evaluated
    assert set(notes) == {"train", "test"}
    assert json.loads((tmp_path / "report" / "mining.json").read_text())["pairs"] == {
        k: len(v) for k, v in after.items()}


def test_step_passes_data_without_events_through(tmp_path):
    from components.common.canonical import load_canonical
    from components.mine_pairs.run import step

    src = _canonical(tmp_path, with_events=False)
    done = step(src, str(tmp_path / "out"), str(tmp_path / "report"), MineConfig())
    assert done == {"status": "skipped", "reason": "the data has no events"}
    _, before, _ = load_canonical(src)
    _, after, manifest = load_canonical(str(tmp_path / "out"))
    assert manifest["mining"]["status"] == "skipped"
    assert before.keys() == after.keys()
    for name in before:
        pd.testing.assert_frame_equal(after[name], before[name])


# -- engine choice: in memory or user buckets on disk (mine.in_memory_max_events) ---------------


def _splits_of(out: str) -> dict[str, pd.DataFrame]:
    return {name: read_table(os.path.join(out, f"pairs_{name}.parquet"))
            for name in ("train", "val", "test")}


@pytest.mark.parametrize("split,min_users,symmetric,quantiles", [
    ("time", 2, True, (0.0, 1.0)), ("time", 1, False, (0.0, 1.0)), ("note", 2, True, (0.0, 1.0)),
    ("none", 1, True, (0.0, 1.0)), ("time", 2, True, (0.1, 0.9)), ("none", 2, False, (0.1, 0.9))])
def test_both_engines_give_the_same_pairs_and_summary(tmp_path, split, min_users, symmetric,
                                                      quantiles):
    events = _drifting_log()
    events.loc[events.index[::50], "note_id"] = "gone"  # dropped: not in the notes tables
    path = str(tmp_path / "events.parquet")
    events.iloc[::-1].to_parquet(path, index=False, row_group_size=500)  # not in time order
    known = set(events["note_id"]) - {"gone"}
    cfg = MineConfig(window_s=1800, split=split, test_share=0.3, min_users=min_users,
                     symmetric=symmetric, top_k=3, seed=1, min_score_quantile=quantiles[0],
                     max_score_quantile=quantiles[1])
    memory = run(path, str(tmp_path / "memory"), cfg, notes_ids=known)
    # 2400 events over a limit of 700: 7 user buckets, streamed 700 rows at a time, and 7 pair
    # partitions by note, so most pairs span two partitions and are ranked from each
    buckets = run(path, str(tmp_path / "buckets"), replace(cfg, in_memory_max_events=700),
                  notes_ids=known)
    assert memory.pop("engine")["name"] == "in_memory"
    assert buckets.pop("engine") == {"name": "buckets", "events_estimated": len(events),
                                     "in_memory_max_events": 700}
    memory["config"].pop("in_memory_max_events"), buckets["config"].pop("in_memory_max_events")
    # scores summed bucket by bucket may differ from the one-pass sums in the last bit
    quantiles = buckets.pop("score_quantiles")
    assert quantiles == {k: pytest.approx(v, rel=1e-12)
                         for k, v in memory.pop("score_quantiles").items()}
    for mined in ("mining_before", "mining_after"):  # the outlier drop's bounds likewise
        bounds = buckets["split"].get(mined, {}).pop("score_bounds", None)
        assert bounds == (None if bounds is None else pytest.approx(
            memory["split"][mined].pop("score_bounds"), rel=1e-12))
    assert buckets == memory and memory["events"]["dropped_unknown_notes"] == 48
    got, expected = _splits_of(str(tmp_path / "buckets")), _splits_of(str(tmp_path / "memory"))
    assert len(expected["train"]) and (split == "none" or len(expected["test"]))
    for name in expected:
        pd.testing.assert_frame_equal(got[name], expected[name], check_exact=False, rtol=1e-12)


def test_the_step_streams_the_canonical_events(tmp_path):
    from components.common.canonical import load_canonical
    from components.mine_pairs.run import step

    src = _canonical(tmp_path, with_events=True)
    cfg = MineConfig(val_share=0.2)
    done = {name: step(src, str(tmp_path / name), str(tmp_path / f"report-{name}"), c)
            for name, c in (("memory", cfg), ("buckets", replace(cfg, in_memory_max_events=50)))}
    assert done["buckets"]["engine"]["name"] == "buckets"
    assert done["memory"]["engine"]["name"] == "in_memory"
    assert done["buckets"]["pairs"] == done["memory"]["pairs"] and done["memory"]["pairs"]["train"]
    got, expected = load_canonical(str(tmp_path / "buckets"))[1], load_canonical(
        str(tmp_path / "memory"))[1]
    for name in expected:
        pd.testing.assert_frame_equal(got[name], expected[name], check_exact=False, rtol=1e-12)


def test_pair_partitions_rank_each_note_once_and_sum_alike(tmp_path, monkeypatch):
    """Many pair partitions (a hash of each note id) give the pairs and stats of one table."""
    monkeypatch.setattr(mine_module, "MIN_USERS_COVERAGE", 0.0)
    events = mine_module._prepare(pd.concat([_random_log(s).assign(user_id=lambda d, s=s:
                                                                   d.user_id + str(s))
                                             for s in range(4)], ignore_index=True))
    for symmetric in (True, False):
        cfg = MineConfig(window_s=1800, top_k=2, symmetric=symmetric, min_users=2)
        expected, expected_stats = mine_module._mine(events, cfg)
        drop = pd.unique(expected["target_id"])[::3]  # notes whose pairs are removed
        for name, notes in (("all", None), ("drop", pa.array(drop, pa.string()))):
            os.makedirs(tmp_path / f"{symmetric}-{name}")
            partial = mine_module._Partial(str(tmp_path / f"{symmetric}-{name}"), 5)
            for _, part in events.groupby(events["user_id"].str[-1]):  # 4 disjoint user sets
                partial.add(part.reset_index(drop=True), cfg)
            assert len(partial.writers) >= 3  # the pairs really are spread
            got, stats, removed = partial.select(cfg, notes)
            assert stats == expected_stats and len(expected)
            touching = expected["query_id"].isin(drop) | expected["target_id"].isin(drop)
            assert removed == (0 if notes is None else touching.sum()) and (notes is None or removed)
            want = expected if notes is None else expected[~touching].reset_index(drop=True)
            pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-12)


@pytest.mark.parametrize("share", [0.0, 0.2, 0.5, 0.97])
def test_time_cutoff_from_buckets_is_the_quantile(tmp_path, share, monkeypatch):
    """The streamed cut-off narrows a histogram pass by pass; it lands on numpy's quantile."""
    monkeypatch.setattr(mine_module, "_SELECT_ROWS", 7)  # force several narrowing passes
    rng = np.random.default_rng(5)
    times = np.r_[rng.integers(-10**15, 10**18, 3000), np.full(40, 123456789)]  # ties too
    paths = []
    for i, chunk in enumerate(np.array_split(rng.permutation(times), 4)):
        paths.append(str(tmp_path / f"{i}.parquet"))
        pd.DataFrame({"t": chunk}).to_parquet(paths[-1])
    cfg = MineConfig(test_share=share)
    assert mine_module._cutoff_of_buckets(paths, len(times), cfg) == \
        mine_module._cutoff(times, cfg)


@pytest.mark.parametrize("bad", ["yesterday", ""])
def test_bad_timestamp_names_file_row_and_field_on_both_engines(tmp_path, bad):
    events = pd.concat([HAND] * 3, ignore_index=True)
    events["ts"] = events["ts"].map(pd.Timestamp.isoformat)
    events.loc[29, "ts"] = bad  # file row 30: in the second streamed batch
    path = str(tmp_path / "events.csv")
    events.to_csv(path, index=False)
    message = rf"events\.csv row 30, field 'ts': unparseable timestamp '{bad}'"
    for limit in (10**6, 17):  # in memory, then streamed 17 rows at a time
        with pytest.raises(DataError, match=message):
            run(path, str(tmp_path / "out"), MineConfig(in_memory_max_events=limit))


def test_count_events_reads_no_data(tmp_path):
    from components.mine_pairs.run import _MIN_ROW_BYTES, count_events

    events = _drifting_log()
    events.to_parquet(tmp_path / "e.parquet", index=False, row_group_size=100)
    assert count_events(str(tmp_path / "e.parquet"), "parquet") == len(events)
    events.assign(ts=events.ts.map(pd.Timestamp.isoformat)).to_csv(tmp_path / "e.csv",
                                                                    index=False)
    size = os.path.getsize(tmp_path / "e.csv")
    assert count_events(str(tmp_path / "e.csv"), "csv") == -(-size // _MIN_ROW_BYTES) >= \
        len(events) // 2  # an over-estimate for real ids; never far under


def test_jsonl_events_stream_too(tmp_path):
    events = _drifting_log()
    path = str(tmp_path / "events.jsonl")
    events.assign(ts=events.ts.map(pd.Timestamp.isoformat)).to_json(path, orient="records",
                                                                     lines=True)
    cfg = MineConfig(window_s=1800, split="none", min_users=1)
    memory = run(path, str(tmp_path / "m"), cfg)
    buckets = run(path, str(tmp_path / "b"), replace(cfg, in_memory_max_events=500))
    assert buckets["engine"]["name"] == "buckets" and buckets["pairs"] == memory["pairs"]
    assert buckets["events"] == memory["events"]


# -- the warehouse SQL (components/mine_pairs/pairs.sql) ------------------------------------------


@pytest.mark.parametrize("symmetric,min_users,top_k,quantiles", [
    (True, 1, 2, (0.0, 1.0)), (False, 1, 2, (0.0, 1.0)), (True, 2, 3, (0.0, 1.0)),
    (False, 3, 10**6, (0.0, 1.0)), (True, 1, 10**6, (0.2, 0.9)), (True, 9, 2, (0.0, 1.0))])
@pytest.mark.parametrize("seed", [0, 5])
def test_warehouse_sql_on_duckdb_gives_the_python_pairs(seed, symmetric, min_users, top_k,
                                                        quantiles):
    duckdb = pytest.importorskip("duckdb")
    from components.mine_pairs.run import warehouse_sql

    events = pd.concat([_random_log(seed), _random_log(seed + 1).assign(
        user_id=lambda d: d.user_id + "x"), HAND], ignore_index=True)
    cfg = MineConfig(window_s=1800, symmetric=symmetric, min_users=min_users, top_k=top_k,
                     min_score_quantile=quantiles[0], max_score_quantile=quantiles[1])
    con = duckdb.connect()
    con.register("raw", events)
    con.execute("CREATE VIEW events AS SELECT user_id, note_id, event, epoch_us(ts) AS t FROM raw")
    got = con.execute(warehouse_sql(cfg)).df()
    expected = mine_pairs(events, cfg)
    assert len(expected) > 3
    assert list(got.columns) == ["query_id", "target_id", "score"]
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-12,
                                  check_dtype=False)
