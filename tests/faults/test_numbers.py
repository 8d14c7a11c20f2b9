"""Issue 15, items 2 and 5: numbers that lie. One test query is no evidence; a NaN is never a
hit; a model that produces non-finite vectors is an error, not an index of garbage."""

import numpy as np
import pytest
import torch
from PIL import Image

from components.common.config import RegisterConfig
from components.evaluate.metrics import partner_ranks, recall_at_k
from components.register.promote import decide, rule_text
from model import ModelConfig, NoteInput, build_model, encode

pytestmark = pytest.mark.faults
TINY = ModelConfig(image_size=32, num_query_tokens=4, max_tokens=64, tiny_vocab_size=400,
                   qformer_layers=2, qformer_hidden_size=64, qformer_heads=4,
                   qformer_cross_attention_frequency=1)
CORPUS = ["fluffy bunny at the lake", "spicy noodles near town", "vintage jacket sale"] * 5


def _notes(n):
    return [NoteInput(f"title {i}", f"content {i}", ("Pets",), Image.new("RGB", (40, 40),
                                                                        (40 * i, 90, 7)))
            for i in range(n)]


def test_too_few_queries_never_promote():
    """One test query used to be enough: a single hit promoted (issue 15, item 2)."""
    cfg = RegisterConfig()
    one = {"status": "complete", "n_queries": 1, "R@100": 1.0}
    d = decide(one, cfg)
    assert not d.promote and "below register.min_eval_queries = 50" in d.reasons[0]
    against = one | {"champion_version": "3", "delta/R@100": 1.0, "delta/R@100/ci_low": 1.0,
                     "delta/R@100/ci_high": 1.0}
    assert not decide(against, cfg).promote
    assert decide(one | {"n_queries": 50}, cfg).promote
    assert "at least 50 evaluated test queries" in rule_text(cfg)


def test_a_non_finite_score_is_a_miss_never_a_hit():
    """A NaN query or partner used to rank -1, a perfect hit; a broken competitor never counted."""
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    queries = np.array([[1.0, 0.0], [np.nan, 0.0], [0.0, 1.0]], dtype=np.float32)
    ranks = partner_ranks(queries, pool, np.array([0, 0, 1]))
    assert ranks.tolist()[:2] == [0, 3]  # the NaN query misses at every K
    broken = pool.copy()
    broken[2] = [np.inf, 0.0]  # a competitor scored +inf or NaN sits ahead of the partner
    assert partner_ranks(queries[[0, 2]], broken, np.array([0, 1])).tolist() == [1, 1]
    assert recall_at_k(ranks, [1], 3)["R@1"] == pytest.approx(2 / 3)


def test_encode_refuses_non_finite_vectors():
    broken = build_model(TINY, corpus=CORPUS, seed=0)
    with torch.no_grad():
        broken.head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite vectors"):
        encode(broken, _notes(3), progress=False)
