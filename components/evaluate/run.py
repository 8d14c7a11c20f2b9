"""evaluate: R@K by the reference protocol, modality probes and slices; metrics.json, a Markdown
report with its charts (PNG) and the same report as one self-contained HTML page."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile

import numpy as np
import pandas as pd

from components.common import storage
from components.common.canonical import evaluation_errors, load_canonical
from components.common.config import EvalConfig
from components.common.readers import read_table, write_table
from components.common.schema import DataError
from components.embed.run import read_vectors
from components.evaluate.fusion import (
    channel_similarity,
    fusion_chart,
    fusion_markdown,
    has_fusion,
    text_share_by_slice,
)
from components.evaluate.metrics import dedupe_pairs, evaluate_pairs
from components.evaluate.report import report_html
from model.collator import PROBES

log = logging.getLogger(__name__)


OFFICIAL_LENGTH_SLICES = {"shortquery", "longquery", "shortgtdoc", "longgtdoc"}


def length_slices(test_pairs: pd.DataFrame, test_notes: pd.DataFrame, threshold: int
                  ) -> tuple[dict[str, pd.DataFrame], int]:
    """Test pairs split by the text length (title + content characters) of the query and of the
    target: ``short_query`` (≤ threshold), ``long_query``, ``short_target``, ``long_target``.
    ``threshold`` 0 takes the median length of the test notes. Returns (slices, threshold)."""
    length = dict(zip(test_notes["note_id"], test_notes["title"].str.len()
                      + test_notes["content"].str.len(), strict=True))
    thr = int(threshold or (np.median(list(length.values())) if length else 0))
    q = test_pairs["query_id"].map(length).fillna(0).to_numpy()
    t = test_pairs["target_id"].map(length).fillna(0).to_numpy()
    return ({"short_query": test_pairs[q <= thr], "long_query": test_pairs[q > thr],
             "short_target": test_pairs[t <= thr], "long_target": test_pairs[t > thr]}, thr)


def _protocol(test_pairs, test_ids, vectors: np.ndarray, cfg: EvalConfig, slices: dict,
              index_dir: str = "", ranks: dict | None = None):
    """Main protocol + slices for one set of test-note vectors (rows follow ``test_ids``); with
    ``index_dir`` also the main protocol through the index. ``ranks`` receives the per-query
    ranks of each set ("" for the main protocol, "slice/<name>")."""
    def keep(name: str):
        if ranks is None:
            return None
        return ranks.setdefault(name, [])

    row = {nid: i for i, nid in enumerate(test_ids)}
    kept = dedupe_pairs(zip(test_pairs["query_id"], test_pairs["target_id"], strict=True))
    queries = {q for q, _ in kept}
    pool_ids = [nid for nid in test_ids if nid not in queries]
    pool = vectors[[row[n] for n in pool_ids]] if pool_ids else vectors[:0]
    out: dict[str, float] = {}
    q_vecs = vectors[[row[q] for q, _ in kept]] if kept else vectors[:0]
    m, n = evaluate_pairs(kept, pool_ids, pool, q_vecs, cfg.ks, cfg.query_chunk, keep(""),
                          keep("ids:"))
    out |= m
    counts = {"n_queries": n, "pool_size": len(pool_ids)}
    if index_dir:
        out |= index_recall(index_dir, kept, pool_ids, q_vecs, cfg.ks, cfg.index_max_k,
                            cfg.query_chunk)
    for name, sp in slices.items():
        sk = dedupe_pairs(zip(sp["query_id"], sp["target_id"], strict=True))
        sq = vectors[[row[q] for q, _ in sk]] if sk else vectors[:0]
        sm, sn = evaluate_pairs(sk, pool_ids, pool, sq, cfg.ks, cfg.query_chunk,
                                keep(f"slice/{name}"), keep(f"ids:slice/{name}"))
        out |= {f"slice/{name}/{k}": v for k, v in sm.items()}
        counts[f"slice/{name}/n_queries"] = sn
    return out, counts


MAX_INDEX_DEPTH = 16_384


def index_recall(index_dir: str, kept: list[tuple[str, str]], pool_ids: list[str],
                 q_vecs: np.ndarray, ks, max_k: int, chunk: int) -> dict[str, float]:
    """R@K through the built index: what serving returns. The index holds every embedded note,
    so each query searches deep enough that the results outside the candidate pool (the
    protocol's pool: test notes except the queries) can be skipped, down to a depth of
    ``K·ntotal/pool·1.5`` (at most ``MAX_INDEX_DEPTH``); ``index/short_lists`` is the share of
    queries whose results held fewer than K pool notes, counted as misses beyond their end."""
    from components.index.run import load_index, search

    ks = [k for k in ks if k <= max_k and k < len(pool_ids)]
    if not ks or not kept:
        return {}
    index, ids, meta = load_index(index_dir)
    kmax = max(ks)
    depth = int(min(index.ntotal, MAX_INDEX_DEPTH,
                    math.ceil(kmax * index.ntotal / len(pool_ids) * 1.5) + 16))
    pos = {n: i for i, n in enumerate(ids)}
    missing = [t for _, t in kept if t not in pos]
    if missing:
        raise ValueError(f"{len(missing)} partner(s) are not in the index, e.g. {missing[:3]}")
    in_pool = np.zeros(index.ntotal + 1, dtype=bool)  # the extra slot answers FAISS's -1
    in_pool[[pos[n] for n in pool_ids if n in pos]] = True
    target = np.array([pos[t] for _, t in kept])
    ranks = np.empty(len(kept), dtype=np.float64)
    short = 0
    for s in range(0, len(kept), chunk):
        _, found = search(index, np.ascontiguousarray(q_vecs[s:s + chunk]), depth)  # (c, depth)
        valid = in_pool[found]  # -1 indexes the extra False slot
        pool_rank = np.cumsum(valid, axis=1) - 1
        hit = valid & (found == target[s:s + chunk, None])
        ranks[s:s + chunk] = np.where(hit.any(1), pool_rank[np.arange(len(hit)), hit.argmax(1)],
                                      np.inf)
        short += int((valid.sum(1) < kmax).sum())
    out = {f"index/R@{k}": float(np.mean(ranks < k)) for k in ks}
    return out | {"index/depth": depth, "index/short_lists": short / len(kept),
                  "index/factory": meta.get("factory", "")} | index_choice(meta)


def index_choice(meta: dict) -> dict:
    """The index step's choice from its ``index.json``, for metrics.json and the report: search
    parameters, recall vs exact search, the reason and the candidates measured (factory,
    search parameters, recall, queries/s, speed vs Flat), when it chose by measurement."""
    chosen = meta.get("chosen", {})
    keep = ("factory", "search_params", "reached_target", "recall", "queries_per_second",
            "speed_vs_flat")
    return {"index/search_params": meta.get("search_params", {}),
            "index/recall_vs_exact": meta.get("recall"),
            "index/reason": chosen.get("reason", ""),
            "index/speed_vs_exact_full": chosen.get("speed_vs_exact_full"),
            "index/candidates": [{k: c[k] for k in keep if k in c}
                                 for c in meta.get("candidates", [])]}


def saliency_summary(model_dir: str, test_notes: pd.DataFrame, test_pairs: pd.DataFrame,
                     n_pairs: int, seed: int = 0) -> dict[str, float]:
    """Mean share of the final token's saliency flowing from image slots vs text tokens, over
    a seeded sample of test pairs (NoteLLM-2 §2.5)."""
    from components.common.notes import LazyNotes
    from model import NoteLLM2
    from model.collator import NoteCollator
    from model.saliency import image_text_saliency

    row = {n: i for i, n in enumerate(test_notes["note_id"])}
    usable = test_pairs[test_pairs["query_id"].isin(row) & test_pairs["target_id"].isin(row)
                        & (test_pairs["query_id"] != test_pairs["target_id"])]
    take = usable.sample(n=min(n_pairs, len(usable)), random_state=seed)
    if take.empty:
        return {}
    with storage.local_copy(model_dir) as local:
        model = NoteLLM2.from_pretrained(local)
    lazy = LazyNotes(test_notes)
    keys = [row[q] for q in take["query_id"]] + [row[t] for t in take["target_id"]]
    batch = NoteCollator(model)([lazy[k] for k in keys])
    sal = image_text_saliency(model, batch)
    return {"saliency/image_share": sal["image_share"], "saliency/text_share": sal["text_share"],
            "saliency/pairs": len(take)}


def run(canonical_dir: str, embeddings_dir: str, out_dir: str, cfg: EvalConfig, *,
        model_dir: str = "", index_dir: str = "", champion_dir: str = "",
        champion_version: str = "") -> dict:
    """metrics.json, report.md, its charts and report.html (charts embedded) in ``out_dir``. With probes also the fusion
    diagnostics' channel similarity (``fusion/<probe>/…``, ``fusion_similarity.png``); with
    ``model_dir`` also the saliency summary and the fused vectors' text share
    (``fusion/text_share…``); with ``index_dir`` also R@K through the built index
    (``index/R@K``); with ``champion_dir`` (a saved NoteLLM-2 model) the champion's R@K on the
    same queries and the paired-bootstrap differences (``champion/…``, ``delta/…``)."""
    notes, pairs, manifest = load_canonical(canonical_dir)
    if problems := evaluation_errors(notes, pairs) + ([] if "test" in pairs else [
            "no test pairs (note_pairs_test.csv or pairs_test.parquet, or events to mine "
            "them from): nothing to evaluate"]):
        raise DataError(f"{canonical_dir}: evaluation refused:\n  " + "\n  ".join(problems))
    table, vectors = read_vectors(storage.join(embeddings_dir, "notes.parquet"))
    test_split = "test"
    test_ids = notes[test_split]["note_id"].tolist()
    pos = {nid: i for i, nid in enumerate(table["note_id"])}
    missing = [n for n in test_ids if n not in pos]
    if missing:
        raise ValueError(f"{len(missing)} test note(s) have no vector, e.g. {missing[:3]}")
    test_vecs = vectors[[pos[n] for n in test_ids]]
    slices = {k[len("test_"):]: v for k, v in pairs.items() if k.startswith("test_")}
    extra: dict[str, object] = {}
    if cfg.length_slices and not OFFICIAL_LENGTH_SLICES & set(slices):
        by_length, extra["length_threshold_chars"] = length_slices(
            pairs["test"], notes[test_split], cfg.length_threshold_chars)
        slices |= by_length
    ranks: dict[str, list] = {}
    metrics, counts = _protocol(pairs["test"], test_ids, test_vecs, cfg, slices, index_dir, ranks)
    counts |= extra
    probe_vecs = {}
    if cfg.probes:
        for probe in PROBES:
            uri = storage.join(embeddings_dir, f"probe_{probe}.parquet")
            if not storage.exists(uri):
                raise FileNotFoundError(f"probe embeddings {uri} missing; embed with probes on")
            ptable, pvecs = read_vectors(uri)
            ppos = {nid: i for i, nid in enumerate(ptable["note_id"])}
            probe_vecs[probe] = pvecs[[ppos[n] for n in test_ids]]
            pm, _ = _protocol(pairs["test"], test_ids, probe_vecs[probe], cfg, slices,
                              ranks=(pr := {}))
            ranks[f"probe/{probe}"] = pr.get("", [])
            metrics |= {f"probe/{probe}/{k}": v for k, v in pm.items()}
    fusion_data = None
    if probe_vecs:
        fm, fusion_data = channel_similarity(probe_vecs, test_ids, pairs["test"], slices,
                                             sample=cfg.fusion_unrelated_sample)
        metrics |= fm
    if model_dir and cfg.saliency_pairs > 0:
        metrics |= saliency_summary(model_dir, notes[test_split], pairs["test"],
                                    cfg.saliency_pairs)
    if model_dir and cfg.fusion_pairs > 0:
        metrics |= text_share_by_slice(model_dir, notes[test_split], pairs["test"], slices,
                                       cfg.fusion_pairs)
    if champion_dir:
        metrics |= _versus_champion(champion_dir, notes[test_split], pairs["test"], test_ids,
                                    slices, sorted(probe_vecs), ranks, counts["pool_size"], cfg)
        counts["champion_version"] = champion_version
    result = {**metrics, **counts, "ties": "pessimistic", "status": "complete"}
    write_query_ranks(ranks, storage.join(out_dir, QUERY_RANKS))
    storage.write_text(storage.join(out_dir, "metrics.json"), json.dumps(result, indent=2))
    markdown = report_markdown(result, manifest)
    storage.write_text(storage.join(out_dir, "report.md"), markdown)
    _chart(result, out_dir)
    fusion_chart(fusion_data, result, out_dir)
    # the same report with the charts embedded: one file that renders anywhere
    storage.write_text(storage.join(out_dir, REPORT_HTML), report_html(markdown, out_dir))
    log.info("evaluation: %s", {k: round(v, 4) for k, v in metrics.items() if "/" not in k})
    return result


QUERY_RANKS = "query_ranks.parquet"
REPORT_HTML = "report.html"


def write_query_ranks(ranks: dict[str, list], uri: str) -> None:
    """Per-query ranks of the main protocol and each slice (set "" or "slice/<name>"), with the
    query and partner ids: what a later paired comparison with another evaluation of the same
    queries needs without embedding anything again (see promote.redecide)."""
    frames = []
    for name, found in ranks.items():
        if name.startswith(("ids:", "probe/")) or not found:
            continue
        ids = ranks.get(f"ids:{name}") or [[]]
        frames.append(pd.DataFrame({"set": name, "query_id": [q for q, _ in ids[0]],
                                    "target_id": [t for _, t in ids[0]], "rank": found[0]}))
    if frames:
        write_table(pd.concat(frames, ignore_index=True), uri)


def read_query_ranks(path: str) -> dict[str, pd.DataFrame]:
    """{set: frame of query_id, target_id, rank} from :func:`write_query_ranks`'s file."""
    table = read_table(path)
    return {name: df.reset_index(drop=True) for name, df in table.groupby("set", sort=False)}


def _versus_champion(champion_dir, test_notes, test_pairs, test_ids, slices, probes,
                     ranks: dict[str, list], pool_size: int, cfg: EvalConfig) -> dict:
    """Embed the test notes with the champion and compare on the identical queries."""
    from components.common.notes import LazyNotes
    from components.evaluate.compare import compare_ranks
    from model import NoteLLM2, encode

    with storage.local_copy(champion_dir) as local:
        champion = NoteLLM2.from_pretrained(local)
    lazy = LazyNotes(test_notes)
    theirs: dict[str, list] = {}
    vecs = encode(champion, lazy, progress=False, desc="embed (champion)")
    _protocol(test_pairs, test_ids, vecs, cfg, slices, ranks=theirs)
    for probe in probes:
        pv = encode(champion, lazy, probe=probe, progress=False)
        _protocol(test_pairs, test_ids, pv, cfg, {}, ranks=(pr := {}))
        theirs[f"probe/{probe}"] = pr.get("", [])
    first = {k: v[0] for k, v in ranks.items() if v and not k.startswith("ids:")}
    return compare_ranks(first, {k: v[0] for k, v in theirs.items() if v}, cfg.ks, pool_size,
                         resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed,
                         level=cfg.ci_level)


def groups(metrics: dict) -> dict[str, dict[int, float]]:
    """{"overall": {10: 0.5, ...}, "slice/x": {...}, "probe/y": {...}}"""
    out: dict[str, dict[int, float]] = {}
    for key, v in metrics.items():
        head, _, last = key.rpartition("/")
        if last.startswith("R@"):
            out.setdefault(head or "overall", {})[int(last[2:])] = float(v)
    return out


def report_markdown(result: dict, manifest: dict) -> str:
    g = groups(result)
    ks = sorted({k for series in g.values() for k in series})
    lines = ["# NoteLLM-2 evaluation", "",
             f"Queries: {result['n_queries']}, candidate pool: {result['pool_size']} test notes "
             "(reference protocol: de-duplicated test pairs, queries left out of the pool; ties "
             "counted against the partner).", ""]
    if not ks:
        lines += ["No R@K reported: every K is at least the pool size.", ""]
    else:
        lines += ["| set | queries | " + " | ".join(f"R@{k}" for k in ks) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in ks) + " |"]
        for name, series in g.items():
            sl = name[name.find("slice/"):] if "slice/" in name else ""
            nq = result.get(f"{sl}/n_queries", "") if sl else result["n_queries"]
            lines.append(f"| {name} | {nq} | " + " | ".join(
                f"{series[k]:.4f}" if k in series else "" for k in ks) + " |")
        lines += ["", "![recall@K](recall_at_k.png)", "",
                  "![probes and slices](probes_slices.png)", ""]
    if "champion_version" in result:
        lines += _comparison_markdown(result)
    if result.get("index/factory"):
        lines += _index_markdown(result)
    if "saliency/image_share" in result:
        lines += [f"Saliency over {result['saliency/pairs']} test pairs (share of the final "
                  "token's attention×gradient flow, summed over layers): image "
                  f"{result['saliency/image_share']:.3f}, text {result['saliency/text_share']:.3f}.",
                  ""]
    if has_fusion(result):
        lines += fusion_markdown(result)
    lines += ["Data: " + ", ".join(f"{k} {v}" for k, v in manifest.get("notes", {}).items())
              + " notes; " + ", ".join(f"{k} {v}" for k, v in manifest.get("pairs", {}).items())
              + " pairs.", ""]
    return "\n".join(lines)


def _index_markdown(result: dict) -> list[str]:
    """The index searched: its factory and parameters, recall vs exact search, and the candidates
    the index step measured when it chose by measurement."""
    params = ", ".join(f"{k}={v}" for k, v in result.get("index/search_params", {}).items())
    recall = result.get("index/recall_vs_exact")
    rows = ["## Index", "",
            f"`{result['index/factory']}` ({params or 'exact search'})"
            + (f", recall@K vs exact search {recall:.4f} at build time" if recall is not None
               else "") + (f"; {result['index/reason']}" if result.get("index/reason") else "")
            + ".", ""]
    if cands := result.get("index/candidates"):
        rows += ["| candidate | search parameters | recall vs exact | queries/s | vs Flat |",
                 "| --- | --- | --- | --- | --- |"]
        for c in cands:
            qps = c.get("queries_per_second")
            rows.append(f"| {c['factory']} | "
                        + ", ".join(f"{k}={v}" for k, v in c.get("search_params", {}).items())
                        + f" | {c.get('recall', float('nan')):.4f} | "
                        + (f"{qps:,.0f} | {c.get('speed_vs_flat', 0):.2f}x |" if qps
                           else "target not reached | |"))
        rows.append("")
    return rows


def _comparison_markdown(result: dict) -> list[str]:
    """Challenger vs champion per set, with the paired-bootstrap interval of each difference."""
    rows = ["## Challenger vs champion", "",
            f"Champion: version {result['champion_version']}; the same queries and candidate "
            "pool for both; Δ = challenger − champion with a paired-bootstrap interval.", "",
            "| set | K | challenger | champion | Δ | interval |", "| --- | --- | --- | --- | --- | --- |"]
    from components.evaluate.compare import comparison_rows

    rows += [f"| {name} | {k} | {mine:.4f} | {theirs:.4f} | {d:+.4f} | [{lo:+.4f}, {hi:+.4f}] |"
             for name, k, mine, theirs, d, lo, hi in comparison_rows(result)]
    return rows + [""]


def _chart(result: dict, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = groups(result)
    if not g:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, series in g.items():
        if (name.startswith("probe/") and "/slice/" in name) or name.startswith(
                ("delta", "champion/")):
            continue  # probe slices are in the bar chart, comparisons in the report's table
        ks = sorted(series)
        ax.plot(ks, [series[k] for k in ks], marker="o", label=name,
                linestyle="--" if name.startswith("probe/") else "-")
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out_dir, "recall_at_k.png")
    _bars(g, out_dir)


def _bars(g: dict[str, dict[int, float]], out_dir: str) -> None:
    """R@K at the smallest K: full vectors and each probe, overall and per slice."""
    import matplotlib.pyplot as plt

    k = min(k for series in g.values() for k in series)
    sets = ["overall"] + sorted({n.split("slice/", 1)[1] for n in g if n.startswith("slice/")})
    modes = ["full"] + sorted({n.split("/")[1] for n in g if n.startswith("probe/")})

    def key(mode: str, name: str) -> str:
        base = "" if mode == "full" else f"probe/{mode}"
        tail = "" if name == "overall" else f"slice/{name}"
        return "/".join(x for x in (base, tail) if x) or "overall"

    fig, ax = plt.subplots(figsize=(1.2 + 1.3 * len(sets), 3.8))
    width = 0.8 / len(modes)
    x = np.arange(len(sets))
    for i, mode in enumerate(modes):
        ax.bar(x + (i - (len(modes) - 1) / 2) * width,
               [g.get(key(mode, s), {}).get(k, np.nan) for s in sets], width, label=mode)
    ax.set_xticks(x, sets, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"R@{k}")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, title="vectors", title_fontsize=8)
    fig.tight_layout()
    _save(fig, out_dir, "probes_slices.png")


def _save(fig, out_dir: str, name: str) -> None:
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        fig.savefig(path, dpi=100)
        storage.copy(path, storage.join(out_dir, name))
    plt.close(fig)
