"""The index step: factory choice, recall against exact search, the id map on disk, the checks, and
the CPU/GPU choice. Small clustered collections built by the same code as the benchmark's."""

from __future__ import annotations

import os
import sys

import faiss
import numpy as np
import pandas as pd
import pytest

from components.common.config import IndexConfig
from components.embed.run import vectors_table, write_vectors
from components.index import run as index_run
from components.index.run import (
    auto_nlist,
    build_index,
    check_vectors,
    load_index,
    resolve_factory,
    search,
    visible_gpus,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
from bench_index import clustered_unit_vectors, queries_near  # noqa: E402

QUIET = {"progress": False}


@pytest.fixture(scope="module")
def clustered() -> np.ndarray:
    return clustered_unit_vectors(12_000, d=32, clusters=60, topics=8, seed=1)  # (12000, 32)


def ids_for(n: int) -> list[str]:
    return [f"n{i}" for i in range(n)]


def write_embeddings(root, vectors: np.ndarray, ids: list[str]) -> str:
    out = str(root / "embeddings")
    write_vectors(vectors_table(ids, vectors), os.path.join(out, "notes.parquet"))
    return out


def exact(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]  # (q, k)


def test_flat_recall_check_is_one(clustered):
    index, meta = build_index(clustered[:3000], IndexConfig(recall_queries=200), **QUIET)
    assert meta["factory"] == "Flat" and meta["search_params"] == {}
    assert meta["recall"] == 1.0 and meta["recall_k"] == 100 and meta["recall_queries"] == 200
    assert meta["device"] == "cpu" and meta["ntotal"] == 3000 and meta["dim"] == 32


def test_auto_rule():
    assert resolve_factory("auto", 200_000, 200_000) == "Flat"
    assert resolve_factory("auto", 200_001, 200_000) == "IVF2048,Flat"
    assert auto_nlist(1_000_000) == 4096  # power of two nearest 4*sqrt(N)
    assert auto_nlist(10_000_000) == 16384
    assert auto_nlist(4_000) == 64  # at least 39 training vectors per list
    assert resolve_factory(" IVF64,SQ8 ", 10, 5) == "IVF64,SQ8"  # explicit strings kept


def test_auto_is_flat_up_to_flat_max_and_measured_above(clustered):
    cfg = IndexConfig(flat_max=2_000, recall_queries=50, recall_k=10)
    _, small = build_index(clustered[:2_000], cfg, **QUIET)
    assert small["factory"] == "Flat" and "nlist" not in small and small["candidates"] == []
    assert "flat_max" in small["chosen"]["reason"]

    _, large = build_index(clustered[:3_000], cfg, **QUIET)
    cands = large["candidates"]
    names = [c["factory"] for c in cands]
    assert names[0] == "Flat" and cands[0]["speed_vs_flat"] == 1.0 and cands[0]["recall"] == 1.0
    assert "HNSW32" in names and any(n.startswith("IVF") and n.endswith(",Flat") for n in names)
    reached = [c for c in cands if c["reached_target"]]
    best = max(reached, key=lambda c: c["queries_per_second"])
    assert large["chosen"]["fastest_on_sample"] == best["factory"]
    # the re-check over all vectors keeps it, or replaces it by Flat when it searches slower there
    assert large["factory"] == best["factory"] == large["chosen"]["factory"] or (
        large["factory"] == "Flat" and large["chosen"]["speed_vs_exact_full"] < 1.0)
    assert best["queries_per_second"] >= cands[0]["queries_per_second"]  # never below Flat
    assert all(c["build_seconds"] >= 0 and c["bytes_per_vector"] > 0 for c in cands
               if "error" not in c)
    assert "held-out" in large["chosen"]["query_source"] and large["factory_config"] == "auto"
    assert large["chosen"]["queries"] == 50 and large["chosen"]["sample"] == 2_900


def test_auto_falls_back_to_flat_when_slower_than_exact_over_all(monkeypatch, clustered):
    monkeypatch.setattr(index_run, "candidate_factories",
                        lambda n, d, s: [("Flat", "Flat"), ("IVF16,Flat", "IVF32,Flat")])
    monkeypatch.setattr(index_run, "_speed_vs_exact", lambda index, check: 0.5)
    cfg = IndexConfig(flat_max=1_000, recall_queries=50, recall_k=10, target_recall=0.5)
    _, meta = build_index(clustered[:3_000], cfg, **QUIET)
    if meta["candidates"][1]["queries_per_second"] > meta["candidates"][0]["queries_per_second"]:
        assert meta["factory"] == "Flat" and "0.50x exact search" in meta["chosen"]["reason"]
    assert meta["factory"] == "Flat" and meta["recall"] == 1.0


def test_candidates_keep_list_sizes_on_the_sample():
    pairs = dict(index_run.candidate_factories(1_000_000, 64, 200_000))
    assert pairs["IVF1024,Flat"] == "IVF4096,Flat"  # 4096 lists of ~244 either way
    assert pairs["IVF512,Flat"] == "IVF2048,Flat" and pairs["IVF2048,Flat"] == "IVF8192,Flat"
    assert pairs["IVF1024,PQ32x4fs,RFlat"] == "IVF4096,PQ32x4fs,RFlat"
    assert pairs["Flat"] == "Flat" and pairs["HNSW32"] == "HNSW32"


def test_ivf_reaches_target_recall_with_recorded_nprobe(clustered):
    cfg = IndexConfig(factory="IVF256,Flat", recall_queries=300, target_recall=0.95)
    index, meta = build_index(clustered, cfg, **QUIET)
    assert meta["candidates"] == [] and meta["chosen"]["reason"] == "index.factory"
    nprobe = meta["search_params"]["nprobe"]
    assert 1 <= nprobe < meta["nlist"]  # tuned, not an exhaustive scan
    # tuned to target + margin: the chosen value reaches it, the ladder value below it misses
    assert meta["tuned_to"] == pytest.approx(0.96)
    curve = {step["nprobe"]: step["recall"] for step in meta["tuning"]}
    below = max(v for v in index_run.LADDER if v < nprobe)
    assert curve[nprobe] >= 0.96 > curve[below]
    assert len(curve) <= 8  # galloped and bisected, not walked from 1 (13 ladder values to 16)
    assert meta["recall"] >= 0.93  # a disjoint sample: close to the target, not tuned on
    # fresh queries near the data, plain numpy ground truth
    q = queries_near(clustered, 300, seed=7)
    _, got = search(index, q, 10)
    truth = exact(q, clustered, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth, strict=True)]) >= 0.93
    assert faiss.extract_index_ivf(index).nprobe == nprobe


def test_fixed_nprobe_is_used_and_its_recall_reported(clustered):
    index, meta = build_index(clustered, IndexConfig(factory="IVF256,Flat", nprobe=1,
                                                     recall_queries=200), **QUIET)
    assert meta["search_params"] == {"nprobe": 1} and meta["tuning"] == []
    assert meta["recall"] < 0.95  # one list of 256 misses neighbours; the check says so


def test_duplicate_id_is_named(tmp_path):
    vectors = clustered_unit_vectors(50, d=8, clusters=3)
    ids = ids_for(50)
    ids[40] = "n7"
    emb = write_embeddings(tmp_path, vectors, ids)
    with pytest.raises(ValueError, match=r"duplicate note id.*\bn7\b"):
        index_run.run(emb, str(tmp_path / "index"), IndexConfig(), **QUIET)


def test_dimension_mismatch_names_both_dims(clustered):
    with pytest.raises(ValueError, match=r"32-dimensional.*expected_dim is 64"):
        check_vectors(pd.Series(ids_for(100)), clustered[:100], expected_dim=64)
    index, _ = build_index(clustered[:500], IndexConfig(recall_queries=10), **QUIET)
    with pytest.raises(ValueError, match=r"queries are 16-dimensional.*32-dimensional"):
        search(index, np.ones((2, 16), np.float32), 5)


def test_non_unit_vectors_are_an_error(clustered):
    bad = clustered[:100].copy()
    bad[3] *= 2.0
    with pytest.raises(ValueError, match=r"1 of 100 vectors are not unit length.*note n3"):
        check_vectors(pd.Series(ids_for(100)), bad)


def test_save_load_round_trip(tmp_path, clustered):
    ids = ids_for(len(clustered))
    emb = write_embeddings(tmp_path, clustered, ids)
    out = str(tmp_path / "index")
    cfg = IndexConfig(factory="IVF256,Flat", recall_queries=200)
    meta = index_run.run(emb, out, cfg, **QUIET)
    assert sorted(os.listdir(out)) == ["ids.parquet", "index.faiss", "index.json"]
    assert meta["bytes_per_vector"] == pytest.approx(os.path.getsize(f"{out}/index.faiss")
                                                     / len(ids), abs=0.01)
    assert 32 * 4 < meta["bytes_per_vector"] < 32 * 4 + 16  # the vector, its id, the centroids

    index, loaded_ids, loaded_meta = load_index(out)
    assert loaded_ids == ids and loaded_meta == meta
    assert faiss.extract_index_ivf(index).nprobe == meta["search_params"]["nprobe"]
    fresh, _ = build_index(clustered, cfg, **QUIET)  # same seed: the same index
    q = queries_near(clustered, 50, seed=3)
    d1, i1 = search(index, q, 20)
    d2, i2 = search(fresh, q, 20)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-6)
    assert [loaded_ids[j] for j in i1[0][:3]] == [ids[j] for j in i2[0][:3]]


def test_cpu_path_when_no_gpu(monkeypatch, clustered):
    def no_gpu_please(*args, **kwargs):
        raise AssertionError("the GPU path was taken without a GPU")

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", no_gpu_please, raising=False)
    _, meta = build_index(clustered[:3000], IndexConfig(factory="IVF64,Flat", recall_queries=50),
                          **QUIET)
    assert meta["device"] == "cpu" and meta["gpus"] == 0
    with pytest.raises(RuntimeError, match="use_gpu=always but FAISS sees no GPU"):
        build_index(clustered[:100], IndexConfig(use_gpu="always"), **QUIET)


def test_gpu_orchestration_with_stand_in_gpus(monkeypatch, clustered):
    """The GPU path's steps, with FAISS's GPU calls standing in as CPU no-ops: k-means on the
    GPUs, the index moved there, copied back for saving; HNSW (no GPU version) falls back."""
    calls = []

    def to_gpus(index, *args, **kwargs):
        name = type(faiss.downcast_index(index)).__name__
        if "HNSW" in name:
            raise RuntimeError("not implemented for GPU")
        calls.append(name)
        return index

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_gpus, raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda i: calls.append("back") or i,
                        raising=False)
    _, meta = build_index(clustered[:3000], IndexConfig(flat_max=1_000, recall_queries=100),
                          **QUIET)
    assert calls == ["IndexFlatL2", "IndexIVFFlat", "back"]
    assert meta["candidates"] == [] and "GPU build" in meta["chosen"]["reason"]  # by rule
    assert meta["device"] == "gpu" and meta["gpus"] == 2 and meta["recall"] > 0.9
    _, meta = build_index(clustered[:500], IndexConfig(factory="HNSW8", recall_queries=20),
                          **QUIET)
    assert meta["device"] == "cpu" and meta["gpus"] == 0
    with pytest.raises(RuntimeError, match="cannot go to the GPU"):
        build_index(clustered[:500], IndexConfig(factory="HNSW8", use_gpu="always"), **QUIET)


@pytest.mark.gpu
@pytest.mark.skipif(visible_gpus() == 0, reason="no CUDA GPU visible to FAISS (faiss-cpu, or "
                                                "no device)")
def test_gpu_build_matches_cpu_quality(clustered):
    cfg = IndexConfig(flat_max=1_000, recall_queries=300, use_gpu="always")
    index, meta = build_index(clustered, cfg, **QUIET)
    assert meta["device"] == "gpu" and meta["gpus"] == visible_gpus()
    assert "Gpu" not in type(index).__name__  # copied back to the CPU for saving
    assert meta["recall"] >= 0.93
    _, flat = build_index(clustered[:3000], cfg, **QUIET)
    assert flat["recall"] == 1.0


class _StepProbe:
    """Recall that rises with the knob: 0.5 below ``need``, 0.97 from it on; counts searches."""

    def __init__(self, need: int, shift: float = 0.0):
        self.need, self.shift, self.searches, self.seconds = need, shift, [], 0.0

    def recall(self, index) -> float:
        value = index.nprobe
        self.searches.append(value)
        self.seconds = value / 100  # larger values search longer
        return (0.97 if value >= self.need else 0.5) - self.shift


def test_tune_gallops_and_bisects_to_the_smallest_value():
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(8), 8, 4096, faiss.METRIC_INNER_PRODUCT)
    for need, start in [(861, 0), (861, 13), (13, 861), (1, 54), (4096, 0)]:
        probe = _StepProbe(need)
        value, curve, reached = index_run.tune(index, probe, "nprobe", 0.95, upper=4096,
                                               start=start)
        assert reached and value == min(v for v in index_run.LADDER if v >= need)
        assert [c["nprobe"] for c in curve] == sorted(set(probe.searches))  # in knob order
        assert len(probe.searches) <= 14  # the ladder to 4096 has 49 values
    # a search that misses and is already slower than allowed ends the tuning: not reached
    probe = _StepProbe(861)
    value, curve, reached = index_run.tune(index, probe, "nprobe", 0.95, upper=4096,
                                           give_up_seconds=0.5)
    assert not reached and max(probe.searches) < 861 and value == max(probe.searches)


def test_check_sample_below_target_steps_the_knob_up(monkeypatch, clustered):
    """Tuning reaches target + margin on its sample; a check sample still below the target makes
    the knob step up until it reaches it, and the index ships at that setting."""
    made = []

    class Probe:
        def __init__(self, vectors, rows, k):
            self.check, self.k = bool(made), k  # the second probe made is the check sample
            made.append(self)

        def recall(self, index):
            nprobe = faiss.extract_index_ivf(index).nprobe
            return min(1.0, nprobe / 20) - (0.1 if self.check else 0.0)

    monkeypatch.setattr(index_run, "_RecallProbe", Probe)
    cfg = IndexConfig(factory="IVF64,Flat", recall_queries=50, target_recall=0.9,
                      recall_margin=0.01)
    index, meta = build_index(clustered[:3_000], cfg, **QUIET)
    # tuning stops at nprobe 19 (0.95 >= 0.91; 16 gives 0.80); the check sample gives 0.85
    # there and reaches 0.9 from nprobe 20 on: the next ladder value, 23
    reached = [s["nprobe"] for s in meta["tuning"] if s["recall"] >= 0.91]
    assert min(reached) == 19 and meta["search_params"]["nprobe"] == 23
    assert [s["nprobe"] for s in meta["check_step_up"]][-1] == 23
    assert meta["recall"] == pytest.approx(1.0 - 0.1) and meta["recall"] >= 0.9
    assert faiss.extract_index_ivf(index).nprobe == meta["search_params"]["nprobe"]
