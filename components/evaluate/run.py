"""evaluate: R@K by the reference protocol, modality probes and slices; metrics.json, a Markdown
report and a recall@K chart."""

from __future__ import annotations

import json
import logging
import os
import tempfile

import numpy as np

from components.common import storage
from components.common.canonical import load_canonical
from components.common.config import EvalConfig
from components.embed.run import read_vectors
from components.evaluate.metrics import dedupe_pairs, evaluate_pairs

log = logging.getLogger(__name__)


def _protocol(test_pairs, test_ids, vectors: np.ndarray, cfg: EvalConfig, slices: dict):
    """Main protocol + slices for one set of test-note vectors (rows follow ``test_ids``)."""
    row = {nid: i for i, nid in enumerate(test_ids)}
    kept = dedupe_pairs(zip(test_pairs["query_id"], test_pairs["target_id"], strict=True))
    queries = {q for q, _ in kept}
    pool_ids = [nid for nid in test_ids if nid not in queries]
    pool = vectors[[row[n] for n in pool_ids]] if pool_ids else vectors[:0]
    out: dict[str, float] = {}
    q_vecs = vectors[[row[q] for q, _ in kept]] if kept else vectors[:0]
    m, n = evaluate_pairs(kept, pool_ids, pool, q_vecs, cfg.ks, cfg.query_chunk)
    out |= m
    counts = {"n_queries": n, "pool_size": len(pool_ids)}
    for name, sp in slices.items():
        sk = dedupe_pairs(zip(sp["query_id"], sp["target_id"], strict=True))
        sq = vectors[[row[q] for q, _ in sk]] if sk else vectors[:0]
        sm, sn = evaluate_pairs(sk, pool_ids, pool, sq, cfg.ks, cfg.query_chunk)
        out |= {f"slice/{name}/{k}": v for k, v in sm.items()}
        counts[f"slice/{name}/n_queries"] = sn
    return out, counts


def run(canonical_dir: str, embeddings_dir: str, out_dir: str, cfg: EvalConfig) -> dict:
    notes, pairs, manifest = load_canonical(canonical_dir)
    table, vectors = read_vectors(storage.join(embeddings_dir, "notes.parquet"))
    test_split = "test" if "test" in notes else next(iter(notes))
    test_ids = notes[test_split]["note_id"].tolist()
    pos = {nid: i for i, nid in enumerate(table["note_id"])}
    missing = [n for n in test_ids if n not in pos]
    if missing:
        raise ValueError(f"{len(missing)} test note(s) have no vector, e.g. {missing[:3]}")
    test_vecs = vectors[[pos[n] for n in test_ids]]
    slices = {k[len("test_"):]: v for k, v in pairs.items() if k.startswith("test_")}
    metrics, counts = _protocol(pairs["test"], test_ids, test_vecs, cfg, slices)
    if cfg.probes:
        for probe in ("text_only", "image_only"):
            uri = storage.join(embeddings_dir, f"probe_{probe}.parquet")
            if not storage.exists(uri):
                raise FileNotFoundError(f"probe embeddings {uri} missing; embed with probes on")
            ptable, pvecs = read_vectors(uri)
            ppos = {nid: i for i, nid in enumerate(ptable["note_id"])}
            pm, _ = _protocol(pairs["test"], test_ids, pvecs[[ppos[n] for n in test_ids]], cfg,
                              slices)
            metrics |= {f"probe/{probe}/{k}": v for k, v in pm.items()}
    result = {**metrics, **counts, "ties": "pessimistic", "status": "complete"}
    storage.write_text(storage.join(out_dir, "metrics.json"), json.dumps(result, indent=2))
    storage.write_text(storage.join(out_dir, "report.md"), report_markdown(result, manifest))
    _chart(result, out_dir)
    log.info("evaluation: %s", {k: round(v, 4) for k, v in metrics.items() if "/" not in k})
    return result


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
    lines += ["Data: " + ", ".join(f"{k} {v}" for k, v in manifest.get("notes", {}).items())
              + " notes; " + ", ".join(f"{k} {v}" for k, v in manifest.get("pairs", {}).items())
              + " pairs.", ""]
    return "\n".join(lines)


def _chart(result: dict, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = groups(result)
    if not g:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, series in g.items():
        if name.startswith("probe/") and "/slice/" in name:
            continue  # in the bar chart
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
        with open(path, "rb") as f:
            storage.write_bytes(storage.join(out_dir, name), f.read())
    plt.close(fig)
