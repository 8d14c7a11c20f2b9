"""Champion vs challenger on identical queries: per-query hits and paired bootstrap intervals.

Both models are evaluated on the same de-duplicated queries and the same candidate pool, so each
query gives a pair of outcomes (hit or miss at each K). The difference of R@K is the mean of the
per-query differences, and its confidence interval comes from resampling *queries* (the pairing
is kept), not the two models independently — the paired bootstrap.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


def paired_bootstrap(hits_a: np.ndarray, hits_b: np.ndarray, *, resamples: int = 1000,
                     seed: int = 0, level: float = 0.95, block: int = 50
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``hits_a``, ``hits_b``: (n, K) 0/1 outcomes of two models on the same n queries.

    Returns (delta, low, high), each (K,): ``delta = mean(a) − mean(b)`` and the percentile
    interval at ``level`` of that mean over ``resamples`` resamples of the queries with
    replacement. Vectorised: a block of resamples becomes a (block, n) matrix of draw counts,
    and one matrix product gives their mean differences.
    """
    d = hits_a.astype(np.float32) - hits_b.astype(np.float32)  # (n, K)
    n = len(d)
    if n == 0:
        nan = np.full(d.shape[1], np.nan)
        return nan, nan, nan
    rng = np.random.default_rng(seed)
    means = np.empty((resamples, d.shape[1]), dtype=np.float64)
    for s in range(0, resamples, block):
        b = min(block, resamples - s)
        draws = rng.integers(0, n, size=(b, n))  # the same stream as one draw per resample
        counts = np.bincount((np.arange(b)[:, None] * n + draws).ravel(),
                             minlength=b * n).reshape(b, n)
        means[s:s + b] = counts.astype(np.float32) @ d / n
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail], axis=0)
    return d.mean(axis=0, dtype=np.float64), low, high


def paired_bootstrap_loop(hits_a: np.ndarray, hits_b: np.ndarray, *, resamples: int = 1000,
                          seed: int = 0, level: float = 0.95):
    """The plain loop over resamples (the benchmark's baseline and the tests' reference)."""
    d = hits_a.astype(np.float32) - hits_b.astype(np.float32)
    n = len(d)
    rng = np.random.default_rng(seed)
    means = np.array([d[rng.integers(0, n, size=n)].mean(axis=0) for _ in range(resamples)])
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail], axis=0)
    return d.mean(axis=0, dtype=np.float64), low, high


def compare_ranks(challenger: dict[str, np.ndarray], champion: dict[str, np.ndarray],
                  ks: Sequence[int], pool_size: int, *, resamples: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict[str, float]:
    """Metrics-file keys from per-query ranks of both models for each evaluated set (``""`` is
    the main protocol, else e.g. ``slice/x`` or ``probe/text_only``): ``champion/<set>/R@K``,
    ``delta/<set>/R@K`` (challenger − champion) and ``delta/<set>/R@K/ci_low|ci_high``."""
    ks = [k for k in ks if k < pool_size]
    out: dict[str, float] = {}
    for name, ra in challenger.items():
        rb = champion.get(name)
        if rb is None or len(rb) != len(ra) or not ks:
            continue
        ha = ra[:, None] < np.array(ks)  # (n, K)
        hb = rb[:, None] < np.array(ks)
        delta, low, high = paired_bootstrap(ha, hb, resamples=resamples, seed=seed, level=level)
        prefix = f"{name}/" if name else ""
        for i, k in enumerate(ks):
            out[f"champion/{prefix}R@{k}"] = float(hb[:, i].mean()) if len(hb) else 0.0
            out[f"delta/{prefix}R@{k}"] = float(delta[i])
            out[f"delta/{prefix}R@{k}/ci_low"] = float(low[i])
            out[f"delta/{prefix}R@{k}/ci_high"] = float(high[i])
    return out


def comparison_rows(metrics: dict) -> list[tuple[str, int, float, float, float, float, float]]:
    """(set, K, challenger, champion, Δ, interval low, interval high) for every compared R@K
    in a metrics file; the set is "overall" for the main protocol."""
    rows = []
    for key, delta in metrics.items():
        if not key.startswith("delta/") or key.endswith(("ci_low", "ci_high")):
            continue
        name, _, k = key[len("delta/"):].rpartition("/")
        mine = metrics.get(f"{name}/{k}" if name else k)
        if mine is not None:
            rows.append((name or "overall", int(k[2:]), mine,
                         metrics["champion/" + key[len("delta/"):]], delta,
                         metrics[key + "/ci_low"], metrics[key + "/ci_high"]))
    return rows


def find_champion(tracking_uri: str, model_name: str, alias: str = "champion"
                  ) -> tuple[str, str] | None:
    """(version, local folder of its NoteLLM-2 model) of ``model_name@alias``, or None when the
    registry has no such model or alias. The folder is a fresh download."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code) or "not found" in str(e).lower():
            return None
        raise
    log.info("champion: %s version %s", model_name, version.version)
    return str(version.version), download_model(f"models:/{model_name}/{version.version}",
                                                tracking_uri)


def download_model(ref: str, tracking_uri: str | None = None) -> str:
    """A fresh local folder holding the NoteLLM-2 model of a registered pyfunc (``models:/…``
    or ``runs:/…``): the ``artifacts/model`` the register step logged."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=ref,
                                                dst_path=tempfile.mkdtemp(prefix="notellm2-"))
    path = os.path.join(local, "artifacts", "model")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{ref} holds no NoteLLM-2 model under artifacts/model "
                                f"(found {os.listdir(local)})")
    return path
