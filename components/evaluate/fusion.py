"""Fusion diagnostics: why a fused note vector loses partners related in one modality only.

Two views, both per slice of the test pairs:

* channel similarity: with the probe vectors (text channel = ``text_only`` probe, the image
  zeroed; image channel = ``image_only`` probe, the text emptied), how similar a pair's two notes
  are in each channel, against a seeded sample of unrelated note pairs. A partner whose channel
  cosine sits inside the unrelated distribution carries no evidence in that channel; where the
  fused vector still weighs that channel, its chance similarity competes with the other
  channel's match. ``partner_above_p99`` is the share of a slice's partners whose cosine
  exceeds the 99th percentile of the unrelated pairs (about 0.01 for a channel that carries no
  evidence).
* text share: for the late-fusion variants, how much of each note's fused vector comes from
  the LLM (text) side: the mean gate ``z`` (``model.fusion=gate``) or the learned weight ``w``
  (``model.fusion=concat``); 1 = text only, 0 = image only.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from components.common import storage

log = logging.getLogger(__name__)

CHANNELS = {"text_only": "text", "image_only": "image"}  # probe -> the channel it isolates
LENGTH_PREFIXES = ("short", "long")  # length slices: short_query, longgtdoc, ...
CHART = "fusion_similarity.png"


def is_length_slice(name: str) -> bool:
    return name.startswith(LENGTH_PREFIXES)


def _pair_rows(pairs: pd.DataFrame, row: dict[str, int]) -> np.ndarray:
    """(n, 2) row indices of the pairs whose notes are both in ``row``; self pairs and repeats
    of an unordered pair are left out."""
    seen: set[tuple[int, int]] = set()
    out = []
    for q, t in zip(pairs["query_id"], pairs["target_id"], strict=True):
        if q not in row or t not in row or q == t:
            continue
        key = (min(row[q], row[t]), max(row[q], row[t]))
        if key not in seen:
            seen.add(key)
            out.append((row[q], row[t]))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def unrelated_pairs(n: int, related: set[tuple[int, int]], sample: int, seed: int = 0
                    ) -> np.ndarray:
    """(m, 2) row indices of pairs of two different notes out of ``n`` that are not related
    (``related`` holds (low, high) index pairs). When there are at most ``sample`` such pairs,
    all of them; else a seeded sample of ``sample`` drawn with replacement."""
    total = n * (n - 1) // 2
    if n < 2 or sample <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    if total - len(related) <= sample:
        i, j = np.triu_indices(n, k=1)
        keep = np.array([(a, b) not in related for a, b in zip(i.tolist(), j.tolist(),
                                                                  strict=True)], dtype=bool)
        return np.stack([i[keep], j[keep]], axis=1).astype(np.int64)
    rng = np.random.default_rng(seed)
    got: list[np.ndarray] = []
    have = 0
    for _ in range(100):  # the unrelated pairs are the bulk: a round or two is enough
        a = rng.integers(0, n, size=2 * sample)
        b = rng.integers(0, n, size=2 * sample)
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        ok = lo != hi
        if related:
            ok &= np.array([(x, y) not in related for x, y in zip(lo.tolist(), hi.tolist(),
                                                                    strict=True)], dtype=bool)
        got.append(np.stack([lo[ok], hi[ok]], axis=1))
        have += int(ok.sum())
        if have >= sample:
            break
    return np.concatenate(got)[:sample].astype(np.int64)


def _cos(vecs: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Cosine of each row pair (the vectors are unit length: a dot product)."""
    if not len(idx):
        return np.zeros(0, dtype=np.float64)
    a, b = vecs[idx[:, 0]].astype(np.float64), vecs[idx[:, 1]].astype(np.float64)
    return np.einsum("nd,nd->n", a, b)


def channel_similarity(probe_vecs: dict[str, np.ndarray], test_ids: list[str],
                       test_pairs: pd.DataFrame, slices: dict[str, pd.DataFrame], *,
                       sample: int = 20000, seed: int = 0) -> tuple[dict[str, float], dict]:
    """Per probe channel: the cosine of each test pair's two notes (overall and per slice)
    against a seeded sample of unrelated note pairs (the same sample for every channel).

    ``probe_vecs[probe]``: (N, d) unit vectors, rows following ``test_ids``. Pairs whose notes
    are not both test notes are skipped. Returns (metrics, plotting data): ``fusion/<probe>/``
    ``partner_cos_mean``, ``partner_above_p99``, ``unrelated_cos_mean|std|p99`` and
    ``slice/<name>/partner_cos_mean|partner_above_p99``; the data holds the cosines
    (``partners[probe][set]`` with set "all" or a slice name, ``unrelated[probe]``) and
    ``p99[probe]``."""
    row = {nid: i for i, nid in enumerate(test_ids)}
    sets = {"all": _pair_rows(test_pairs, row)}
    sets |= {name: _pair_rows(sp, row) for name, sp in slices.items()}
    related = {(min(a, b), max(a, b)) for idx in sets.values() for a, b in idx.tolist()}
    unrel = unrelated_pairs(len(test_ids), related, sample, seed)
    metrics: dict[str, float] = {"fusion/unrelated_pairs": len(unrel),
                                 "fusion/partner_pairs": len(sets["all"])}
    data: dict = {"partners": {}, "unrelated": {}, "p99": {}}
    for probe, vecs in probe_vecs.items():
        u = _cos(vecs, unrel)
        if not len(u):
            continue
        p99 = float(np.percentile(u, 99))
        data["unrelated"][probe], data["p99"][probe] = u, p99
        data["partners"][probe] = {}
        pre = f"fusion/{probe}/"
        metrics |= {pre + "unrelated_cos_mean": float(u.mean()),
                    pre + "unrelated_cos_std": float(u.std()),
                    pre + "unrelated_cos_p99": p99}
        for name, idx in sets.items():
            c = _cos(vecs, idx)
            if not len(c):
                continue
            data["partners"][probe][name] = c
            key = pre if name == "all" else f"{pre}slice/{name}/"
            metrics |= {key + "partner_cos_mean": float(c.mean()),
                        key + "partner_above_p99": float(np.mean(c > p99))}
    return metrics, data


def text_share_by_slice(model_dir: str, test_notes: pd.DataFrame, test_pairs: pd.DataFrame,
                        slices: dict[str, pd.DataFrame], n_pairs: int = 256, seed: int = 0
                        ) -> dict[str, float]:
    """The mean text share of the fused vectors (``text_share`` of the model's forward) over
    both notes of a seeded sample of up to ``n_pairs`` pairs, overall (``fusion/text_share``)
    and per slice (``fusion/text_share/slice/<name>``). {} for variants without late fusion."""
    import torch

    from components.common.notes import LazyNotes
    from model import NoteLLM2
    from model.collator import NoteCollator

    row = {n: i for i, n in enumerate(test_notes["note_id"])}

    def take(pairs: pd.DataFrame) -> list[int]:
        usable = pairs[pairs["query_id"].isin(row) & pairs["target_id"].isin(row)
                       & (pairs["query_id"] != pairs["target_id"])]
        s = usable.sample(n=min(n_pairs, len(usable)), random_state=seed)
        return [row[q] for q in s["query_id"]] + [row[t] for t in s["target_id"]]

    sets = {"": take(test_pairs)} | {name: take(sp) for name, sp in slices.items()}
    needed = sorted({i for rows in sets.values() for i in rows})
    if not needed:
        return {}
    with storage.local_copy(model_dir) as local:
        model = NoteLLM2.from_pretrained(local)
    if not model.config.uses_fusion:
        return {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    collator = NoteCollator(model)
    lazy = LazyNotes(test_notes)
    use_amp = device == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    share: dict[int, float] = {}
    with torch.inference_mode():
        for s in range(0, len(needed), 32):
            keys = needed[s:s + 32]
            batch = {k: v.to(device) for k, v in collator([lazy[k] for k in keys]).items()}
            with torch.autocast(device_type="cuda", dtype=amp_dtype, enabled=use_amp):
                ts = model(**batch)["text_share"]
            if ts is None:  # no image reached the fusion
                continue
            share |= dict(zip(keys, ts.float().cpu().numpy().astype(np.float64).tolist(),
                              strict=True))
    out: dict[str, float] = {}
    for name, rows in sets.items():
        vals = [share[i] for i in rows if i in share]
        if vals:
            out["fusion/text_share" + (f"/slice/{name}" if name else "")] = float(np.mean(vals))
    if out:
        out["fusion/text_share_pairs"] = len(sets[""]) // 2
    return out


def has_fusion(result: dict) -> bool:
    return any(k.startswith("fusion/") and k.endswith(("unrelated_cos_mean", "text_share"))
               for k in result)


def fusion_markdown(result: dict) -> list[str]:
    """The report's section: per channel the unrelated pairs' cosine and the partners' mean
    cosine per pair-kind slice (share above the unrelated p99 in brackets); the text share."""
    probes = [p for p in CHANNELS if f"fusion/{p}/unrelated_cos_mean" in result]
    shares = {k: v for k, v in result.items() if k == "fusion/text_share"
              or k.startswith("fusion/text_share/slice/")}
    if not probes and not shares:
        return []
    lines = ["## Fusion diagnostics", ""]
    if probes:
        names = sorted({k.split("/slice/", 1)[1].rsplit("/", 1)[0] for k in result
                        if k.startswith("fusion/") and "/slice/" in k
                        and k.endswith("/partner_cos_mean")})
        names = ["all"] + [n for n in names if not is_length_slice(n)]
        lines += [f"Cosine of the two notes of a test pair in each channel (probe vectors) "
                  f"against {result.get('fusion/unrelated_pairs', '')} unrelated note pairs; "
                  "in brackets the share of partners above the unrelated p99. A channel in "
                  "which a slice's partners look unrelated only adds noise to their fused "
                  "similarity.", "",
                  "| channel | unrelated mean ± std | p99 | " + " | ".join(names) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for p in probes:
            pre = f"fusion/{p}/"
            cells = []
            for n in names:
                key = pre if n == "all" else f"{pre}slice/{n}/"
                m, a = result.get(key + "partner_cos_mean"), result.get(key + "partner_above_p99")
                cells.append("" if m is None else f"{m:.3f} ({a:.2f})")
            lines.append(f"| {CHANNELS[p]} | {result[pre + 'unrelated_cos_mean']:.3f} ± "
                         f"{result[pre + 'unrelated_cos_std']:.3f} | "
                         f"{result[pre + 'unrelated_cos_p99']:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    if shares:
        order = sorted(shares, key=lambda k: (k != "fusion/text_share", k))
        lines += [f"Text share of the fused vector (1 = all text side, 0 = all image side) over "
                  f"up to {result.get('fusion/text_share_pairs', '')} test pairs per set:", "",
                  "| set | text share |", "| --- | --- |"]
        lines += [f"| {k.split('/slice/', 1)[1] if '/slice/' in k else 'overall'} | "
                  f"{shares[k]:.3f} |" for k in order]
        lines.append("")
    return lines + [f"![fusion similarity]({CHART})", ""]


def fusion_chart(data: dict | None, metrics: dict, out_dir: str) -> bool:
    """``fusion_similarity.png``: per channel the density of the unrelated pairs' cosines and
    of each pair-kind slice's partner cosines (all test pairs' where there are no such slices),
    with the unrelated p99; and the mean text share
    per set when measured. False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from components.evaluate.run import _save

    data = data or {"unrelated": {}, "partners": {}, "p99": {}}
    probes = [p for p in CHANNELS if p in data["unrelated"]]
    shares = {("overall" if k == "fusion/text_share" else k.split("/slice/", 1)[1]): v
              for k, v in metrics.items() if k == "fusion/text_share"
              or k.startswith("fusion/text_share/slice/")}
    panels = len(probes) + bool(shares)
    if not panels:
        return False
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8), squeeze=False)
    for ax, p in zip(axes[0], probes, strict=False):
        u = data["unrelated"][p]
        parts = {n: c for n, c in data["partners"][p].items()
                 if n != "all" and not is_length_slice(n)}
        parts = parts or {n: c for n, c in data["partners"][p].items() if n == "all"}
        lo = min([u.min(), *(c.min() for c in parts.values())])
        hi = max([u.max(), *(c.max() for c in parts.values())])
        bins = np.linspace(lo, hi, 41) if hi > lo else np.linspace(lo - 0.5, hi + 0.5, 41)
        ax.hist(u, bins=bins, density=True, alpha=0.5, color="grey", label="unrelated")
        for name, c in parts.items():
            ax.hist(c, bins=bins, density=True, histtype="step", linewidth=1.5,
                    label=f"partners: {name}")
        ax.axvline(data["p99"][p], color="black", linestyle="--", linewidth=1,
                   label="unrelated p99")
        ax.set_title(f"{CHANNELS[p]} channel", fontsize=10)
        ax.set_xlabel("cosine")
        ax.set_ylabel("density")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if shares:
        ax = axes[0][-1]
        names = ["overall"] + sorted(n for n in shares
                                     if n != "overall" and not is_length_slice(n))
        names = [n for n in names if n in shares]
        ax.bar(np.arange(len(names)), [shares[n] for n in names], color="tab:blue")
        ax.set_xticks(np.arange(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set_ylabel("mean text share")
        ax.set_title("text share of the fused vector", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    _save(fig, out_dir, CHART)
    return True
