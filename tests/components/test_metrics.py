import numpy as np
import pytest

from components.evaluate.metrics import dedupe_pairs, evaluate_pairs, partner_ranks, recall_at_k


def reference_ranks(queries, pool, target, exclude):
    """Full sort, ties broken against the partner: the reference the fast path must equal."""
    ranks = []
    for i, q in enumerate(queries):
        scores = pool @ q
        order = [j for j in range(len(pool)) if j != exclude[i] and j != target[i]]
        ranks.append(sum(1 for j in order if scores[j] >= scores[target[i]]))
    return np.array(ranks)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counting_ranks_equals_full_sort_with_ties(seed):
    rng = np.random.default_rng(seed)
    # coarse values make many exact ties
    pool = rng.integers(-2, 3, size=(300, 8)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(57, 8)).astype(np.float32)
    target = rng.integers(0, 300, size=57)
    exclude = np.where(rng.random(57) < 0.5, rng.integers(0, 300, size=57), -1)
    exclude[exclude == target] = -1
    fast = partner_ranks(queries, pool, target, exclude, chunk=10)
    np.testing.assert_array_equal(fast, reference_ranks(queries, pool, target, exclude))


def test_hand_made_case():
    # pool: 4 candidates on a circle; three queries whose partners rank 0, 1 and 3
    pool = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.float32)
    queries = np.array([[1, 0.1], [0.2, 1], [1, 0]], dtype=np.float32)
    pairs = [("q1", "p0"), ("q2", "p0"), ("q3", "p2")]
    m, n = evaluate_pairs(pairs, ["p0", "p1", "p2", "p3"], pool, queries, ks=(1, 2, 3, 10))
    # ranks: q1->p0: 0; q2->p0: p1 scores higher -> 1; q3->p2: p0, p1, p3 tie-or-beat -> 3
    assert n == 3
    assert m == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@3": pytest.approx(2 / 3)}


def test_all_equal_vectors_score_zero():
    pool = np.ones((50, 4), dtype=np.float32)
    queries = np.ones((5, 4), dtype=np.float32)
    ranks = partner_ranks(queries, pool, np.arange(5))
    assert (ranks == 49).all()
    assert recall_at_k(ranks, (10, 20, 100), 50) == {"R@10": 0.0, "R@20": 0.0}


def test_dedupe_follows_reference_order():
    pairs = [("a", "b"), ("b", "c"), ("d", "a"), ("e", "f"), ("g", "g"), ("f", "h")]
    assert dedupe_pairs(pairs) == [("a", "b"), ("e", "f")]


def test_evaluate_step_on_hand_made_vectors(tmp_path):
    """The whole step: de-duplication, pool without queries, slices, probes per slice, files."""
    import json

    import pandas as pd

    from components.common.config import EvalConfig
    from components.common.readers import write_canonical
    from components.common.schema import NoteDataset
    from components.embed.run import write_vectors
    from components.evaluate.run import run

    ids = ["q1", "q2", "t1", "t2", "x"]
    notes = pd.DataFrame({"note_id": ids, "title": "", "content": "", "topics": [[]] * 5,
                          "image_uri": "", "category": "", "_file": "n.csv",
                          "_row": range(1, 6)})

    def pairs(rows):
        return pd.DataFrame({"query_id": [a for a, _ in rows], "target_id": [b for _, b in rows],
                             "score": 1.0, "_file": "p.csv", "_row": range(1, len(rows) + 1)})

    # (q1, t1) appears twice and (t1, q2) re-uses t1: both dropped by the reference protocol
    test = pairs([("q1", "t1"), ("q1", "t1"), ("q2", "t2"), ("t1", "q2")])
    write_canonical(NoteDataset(notes={"test": notes},
                                pairs={"test": test, "test_a": pairs([("q2", "t2")])}),
                    str(tmp_path / "canon"))
    # pool = t1, t2, x. Full vectors: q1's partner t1 ranks 1st; q2's partner t2 ranks 2nd (x
    # is closer). Text probe: both partners rank last.
    full = {"q1": [1, 0], "q2": [0, 1], "t1": [1, 0.1], "t2": [0.6, 0.8], "x": [0, 1]}
    probe = {"q1": [1, 0], "q2": [0, 1], "t1": [-1, 0], "t2": [0, -1], "x": [0.5, 0.5]}
    emb = tmp_path / "emb"
    for name, vecs in (("notes", full), ("probe_text_only", probe), ("probe_image_only", full)):
        write_vectors(pd.DataFrame({"note_id": ids, "vector": [
            np.array(vecs[i], np.float32) / np.linalg.norm(vecs[i]) for i in ids]}),
            str(emb / f"{name}.parquet"))
    m = run(str(tmp_path / "canon"), str(emb), str(tmp_path / "eval"), EvalConfig(ks=(1, 2, 3)))
    assert (m["n_queries"], m["pool_size"]) == (2, 3)
    assert (m["R@1"], m["R@2"]) == (0.5, 1.0)
    assert "R@3" not in m  # K must stay below the pool size
    assert (m["slice/a/R@1"], m["slice/a/R@2"]) == (0.0, 1.0)
    assert (m["probe/text_only/R@1"], m["probe/text_only/R@2"]) == (0.0, 0.0)
    assert m["probe/text_only/slice/a/R@2"] == 0.0
    assert m["probe/image_only/slice/a/R@2"] == 1.0
    out = tmp_path / "eval"
    assert json.loads((out / "metrics.json").read_text())["status"] == "complete"
    # through an exact index the serving-side R@K equals the exact protocol's
    from components.common.config import IndexConfig
    from components.index.run import run as build_index

    build_index(str(emb), str(tmp_path / "index"), IndexConfig(factory="Flat"), progress=False)
    mi = run(str(tmp_path / "canon"), str(emb), str(tmp_path / "eval2"), EvalConfig(ks=(1, 2, 3)),
             index_dir=str(tmp_path / "index"))
    assert (mi["index/R@1"], mi["index/R@2"]) == (m["R@1"], m["R@2"])
    assert mi["index/short_lists"] == 0.0
    assert mi["index/search_params"] == {} and mi["index/candidates"] == []
    assert "## Index" in (tmp_path / "eval2" / "report.md").read_text()
    for f in ("report.md", "recall_at_k.png", "probes_slices.png"):
        assert (out / f).stat().st_size > 0


def test_length_slices_split_queries_and_targets_by_text_length():
    import pandas as pd

    from components.evaluate.run import length_slices

    notes = pd.DataFrame({"note_id": ["a", "b", "c", "d"], "title": ["x", "xx", "", "xxxxx"],
                          "content": ["", "yy", "y", "yyyyy"]})  # lengths 1, 4, 1, 10
    pairs = pd.DataFrame({"query_id": ["a", "b", "c"], "target_id": ["b", "d", "a"]})
    slices, thr = length_slices(pairs, notes, 0)
    assert thr == 2  # median of 1, 4, 1, 10 is 2.5 -> 2
    assert slices["short_query"]["query_id"].tolist() == ["a", "c"]
    assert slices["long_query"]["query_id"].tolist() == ["b"]
    assert slices["short_target"]["target_id"].tolist() == ["a"]
    assert slices["long_target"]["target_id"].tolist() == ["b", "d"]
    assert length_slices(pairs, notes, 5)[0]["long_target"]["target_id"].tolist() == ["d"]


def test_report_lists_the_index_candidates_measured():
    from components.evaluate.run import _index_markdown, index_choice

    meta = {"factory": "IVF4096,Flat", "search_params": {"nprobe": 16}, "recall": 0.961,
            "chosen": {"reason": "fastest of 2 candidates", "speed_vs_exact_full": 24.0},
            "candidates": [
                {"factory": "Flat", "search_params": {}, "reached_target": True, "recall": 1.0,
                 "queries_per_second": 100.0, "speed_vs_flat": 1.0, "build_seconds": 0.1},
                {"factory": "IVF4096,Flat", "search_params": {"nprobe": 16},
                 "reached_target": True, "recall": 0.96, "queries_per_second": 2500.0,
                 "speed_vs_flat": 25.0},
                {"factory": "HNSW32", "search_params": {"efSearch": 512},
                 "reached_target": False, "recall": 0.93}]}
    got = index_choice(meta)
    assert got["index/search_params"] == {"nprobe": 16} and got["index/recall_vs_exact"] == 0.961
    assert [c["factory"] for c in got["index/candidates"]] == ["Flat", "IVF4096,Flat", "HNSW32"]
    assert "build_seconds" not in got["index/candidates"][0]  # the report's columns only
    text = "\n".join(_index_markdown({"index/factory": "IVF4096,Flat", **got}))
    assert "`IVF4096,Flat` (nprobe=16), recall@K vs exact search 0.9610" in text
    assert "| IVF4096,Flat | nprobe=16 | 0.9600 | 2,500 | 25.00x |" in text
    assert "| HNSW32 | efSearch=512 | 0.9300 | target not reached | |" in text
