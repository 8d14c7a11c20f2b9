"""``notellm2 compare``: two models on the same test queries of one data folder."""

from __future__ import annotations

import os
import tempfile

from components.common.config import resolve


def model_dir(ref: str, tracking_uri: str | None) -> str:
    """A local NoteLLM-2 model folder for ``models:/…``, ``runs:/…`` or a folder path."""
    if os.path.isdir(ref):
        return ref
    if not ref.startswith(("models:/", "runs:/")):
        raise ValueError(f"{ref!r} is neither a model folder nor a models:/ or runs:/ URI")
    from components.evaluate.compare import download_model

    return download_model(ref, tracking_uri)


def compare_models(a: str, b: str, data: str, out: str | None = None, *,
                   tracking_uri: str | None = None) -> str:
    """Embed the test notes with A, evaluate A against B (as the champion) on identical
    queries; returns the comparison table (also in ``out``/report.md)."""
    from components.common.readers import read_dataset, write_canonical
    from components.embed.run import run as embed
    from components.evaluate.compare import comparison_rows
    from components.evaluate.run import run as evaluate

    cfg = resolve("tiny", ["embed.scope=test"])
    work = out or tempfile.mkdtemp(prefix="notellm2-compare-")
    canon = os.path.join(work, "canonical")
    write_canonical(read_dataset(data), canon)
    dir_a, dir_b = model_dir(a, tracking_uri), model_dir(b, tracking_uri)
    embed(canon, dir_a, os.path.join(work, "embeddings"), cfg, progress=True)
    m = evaluate(canon, os.path.join(work, "embeddings"), work, cfg.eval, champion_dir=dir_b,
                 champion_version=b)
    lines = [f"A = {a}\nB = {b}\nqueries: {m['n_queries']}, candidate pool: {m['pool_size']}",
             f"{'set':<28}{'K':>7}{'A':>9}{'B':>9}{'A-B':>9}  interval"]
    lines += [f"{name:<28}{k:>7}{mine:>9.4f}{theirs:>9.4f}{d:>+9.4f}  [{lo:+.4f}, {hi:+.4f}]"
              for name, k, mine, theirs, d, lo, hi in comparison_rows(m)]
    lines.append(f"\nreport: {os.path.join(work, 'report.md')}")
    return "\n".join(lines)
