"""Paired bootstrap: the vectorised form equals the plain loop, and its interval covers the true
difference at about the stated rate."""

import numpy as np
import pytest

from components.evaluate.compare import compare_ranks, paired_bootstrap, paired_bootstrap_loop


def test_vectorised_bootstrap_equals_the_loop():
    rng = np.random.default_rng(1)
    a = rng.random((300, 4)) < 0.6
    b = rng.random((300, 4)) < 0.5
    fast = paired_bootstrap(a, b, resamples=200, seed=7, block=33)
    slow = paired_bootstrap_loop(a, b, resamples=200, seed=7)
    for x, y in zip(fast, slow, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_interval_covers_the_true_difference_at_the_stated_rate():
    # queries of varying difficulty; the challenger turns some of the champion's misses into
    # hits: the true difference of R@K is known exactly
    true_delta, level, trials, n = 0.05, 0.90, 300, 400
    covered = 0
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        difficulty = rng.random(n)
        champion = rng.random(n) > difficulty  # P(hit) = 0.5 overall
        flip = rng.random(n) < 2 * true_delta  # P(miss) = 0.5, so +0.05 on average
        challenger = champion | flip
        _, low, high = paired_bootstrap(challenger[:, None], champion[:, None], resamples=400,
                                        seed=seed, level=level)
        covered += bool(low[0] <= true_delta <= high[0])
    rate = covered / trials
    # binomial spread over 300 trials is about ±0.035 at 2 sigma; percentile intervals run a
    # little narrow at small n
    assert level - 0.06 <= rate <= level + 0.05, rate


def test_compare_ranks_keys_and_values():
    mine = {"": np.array([0, 5, 50]), "slice/a": np.array([0])}
    theirs = {"": np.array([3, 50, 50]), "slice/a": np.array([20])}
    out = compare_ranks(mine, theirs, ks=(1, 10, 100), pool_size=60, resamples=50)
    assert "delta/R@100" not in out  # K must stay below the pool size
    assert out["champion/R@10"] == pytest.approx(1 / 3)
    assert out["delta/R@10"] == pytest.approx(2 / 3 - 1 / 3)
    assert out["delta/R@1"] == pytest.approx(1 / 3)
    assert out["delta/slice/a/R@1"] == 1.0 and out["delta/slice/a/R@1/ci_low"] == 1.0
    assert out["delta/R@10/ci_low"] <= out["delta/R@10"] <= out["delta/R@10/ci_high"]
