"""Additive late fusion and one-modality hard negatives: each does what it claims on hand-made
inputs."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import NoteLLM2, build_model, encode
from model.collator import NoteCollator
from model.loss import info_nce, notellm2_loss
from model.network import ConcatFusion, fit_whitening, whitening_stats
from tests.model.test_model import CFG, CORPUS, notes


def test_concat_fusion_adds_the_two_similarities_with_the_learned_share():
    torch.manual_seed(0)
    fusion = ConcatFusion(vision_width=12, text_dim=10, image_dim=6, text_share=0.7)
    t = F.normalize(torch.randn(5, 10), dim=-1)
    cls = torch.randn(5, 12)
    n = fusion(t, cls)
    v = F.normalize(fusion.image_head(cls), dim=-1)
    torch.testing.assert_close(n.norm(dim=-1), torch.ones(5))
    w = float(fusion.text_share().detach())
    assert abs(w - 0.7) < 1e-6
    torch.testing.assert_close(n @ n.T, w * (t @ t.T) + (1 - w) * (v @ v.T))
    # a note without an image: the text channel alone, still a unit vector
    alone = fusion(t, None)
    torch.testing.assert_close(alone, F.pad(t, (0, 6)))


def test_concat_fusion_in_the_network_trains_both_channels_and_the_share():
    model = build_model(replace(CFG, variant="notellm2", fusion="concat"), corpus=CORPUS, seed=0)
    out = model(**NoteCollator(model)(notes(4)))
    assert out["n_m"].shape == (4, CFG.embed_dim) and out["n_v"].shape == (4, CFG.embed_dim)
    torch.testing.assert_close(out["text_share"], torch.full((4,), 0.5))
    loss = notellm2_loss(out, model.log_scale, 9.0, 1.0)["loss"]
    loss.backward()
    for part in (model.fusion.image_head.weight, model.fusion.text_logit, model.head.weight):
        assert part.grad is not None and part.grad.abs().sum() > 0


def test_the_paper_gate_is_unchanged_and_reports_its_share():
    model = build_model(replace(CFG, variant="notellm2"), corpus=CORPUS, seed=0)
    out = model(**NoteCollator(model)(notes(4)))
    assert model.config.fusion == "gate"
    assert ((out["text_share"] > 0) & (out["text_share"] < 1)).all()


def _batch():
    """Anchor a_0 with partner b_0 (alike in both halves of the vector: "text" = dims 0-1,
    "image" = dims 2-3), a second pair, and a look-alike x that copies a_0's text half only."""
    a = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, -1.0]])
    b = torch.tensor([[0.9, 0.1, 0.8, 0.2], [0.1, 0.9, -0.2, -0.9]])
    x = torch.tensor([[1.0, 0.0, -1.0, 0.0]])
    return [F.normalize(t, dim=-1) for t in (a, b, x)]


def test_a_look_alike_is_scored_as_a_negative_of_every_anchor():
    a, b, x = _batch()
    log_scale = torch.tensor(2.0)
    scale = log_scale.exp()
    got = info_nce(a, b, log_scale, extra=x)
    e = torch.cat([a, b])
    want = []
    for i in range(4):  # the loop form, with x as one more column of every row
        cols = [j for j in range(4) if j != i]
        logits = torch.stack([scale * e[i] @ e[j] for j in cols] + [scale * e[i] @ x[0]])
        want.append(F.cross_entropy(logits[None], torch.tensor([cols.index((i + 2) % 4)])))
    torch.testing.assert_close(got, torch.stack(want).mean())
    assert got > info_nce(a, b, log_scale)  # a hard negative makes the task harder


def test_a_look_alike_pushes_the_anchor_to_use_the_other_modality():
    """One gradient step with the text look-alike as a negative moves a_0's vector towards the
    half that tells the partner from the look-alike (the image half) more than without it."""
    moved = {}
    for with_extra in (False, True):
        a, b, x = _batch()
        a = a.clone().requires_grad_(True)
        loss = info_nce(a, b, torch.tensor(2.0), extra=x if with_extra else None)
        loss.backward()
        step = a.detach() - 0.5 * a.grad
        moved[with_extra] = float(F.normalize(step, dim=-1)[0, 2:] @ F.normalize(b, dim=-1)[0, 2:])
    assert moved[True] > moved[False]


def test_a_look_alike_that_is_the_partner_elsewhere_is_no_negative():
    a, b, _ = _batch()
    log_scale = torch.tensor(2.0)
    # the extra row is note 10, i.e. b_0 again: neither a_0 (its partner) nor b_0 (itself)
    # may count it against them; as another note (99) it is a negative of every anchor
    masked = info_nce(a, b, log_scale, keys=torch.tensor([0, 1, 10, 11, 10]), extra=b[:1])
    counted = info_nce(a, b, log_scale, keys=torch.tensor([0, 1, 10, 11, 99]), extra=b[:1])
    torch.testing.assert_close(masked, _without_column(a, b, log_scale))
    assert counted > masked


def _without_column(a, b, log_scale):
    """The loss where a_0's duplicate-partner column is dropped, other rows keep it."""
    scale = log_scale.exp()
    e, dup = torch.cat([a, b]), b[0]
    rows = []
    for i in range(4):
        cols = [e[j] for j in range(4) if j != i]
        target = [j for j in range(4) if j != i].index((i + 2) % 4)
        extra = [] if i in (0, 2) else [dup]  # a_0's partner is b_0; b_0 is the note itself
        logits = torch.stack([scale * e[i] @ c for c in cols + extra])
        rows.append(F.cross_entropy(logits[None], torch.tensor([target])))
    return torch.stack(rows).mean()


# -- channel whitening ---------------------------------------------------------------------------


def test_whitening_stats_decorrelate_an_anisotropic_cloud():
    rng = np.random.default_rng(0)
    common = np.ones(8) / np.sqrt(8)  # every vector leans the same way, as trained channels do
    x = 0.9 * common + 0.3 * rng.standard_normal((4000, 8)) * np.linspace(0.2, 1.0, 8)
    mean, white = whitening_stats(x, shrinkage=0.0)
    y = (x - mean.numpy()) @ white.numpy()
    np.testing.assert_allclose(np.cov(y.T), np.eye(8), atol=1e-6)
    shrunk = whitening_stats(x, shrinkage=0.5)[1].numpy()
    assert np.linalg.cond(shrunk) < np.linalg.cond(white.numpy())  # shrinkage tempers it


def test_fitted_whitening_centres_unrelated_notes_and_survives_save_and_load(tmp_path):
    model = build_model(replace(CFG, variant="notellm2", fusion="concat"), corpus=CORPUS,
                        seed=0).eval()
    sample = notes(80)
    before = encode(model, sample, progress=False)
    fit_whitening(model, sample, progress=False)
    after = encode(model, sample, progress=False)
    off = ~np.eye(len(sample), dtype=bool)
    t_before, t_after = model.fusion.channels(torch.from_numpy(before))[0], \
        model.fusion.channels(torch.from_numpy(after))[0]
    # unrelated notes: from the common cone of a fresh model to around zero
    assert (t_before @ t_before.T)[off].mean() > 0.5
    assert abs(float((t_after @ t_after.T)[off].mean())) < 0.1
    np.testing.assert_allclose(np.linalg.norm(after, axis=1), 1.0, rtol=1e-5)
    model.save_pretrained(str(tmp_path / "m"))
    again = NoteLLM2.from_pretrained(str(tmp_path / "m"))
    np.testing.assert_allclose(encode(again, sample, progress=False), after, atol=1e-5)


def test_whitening_refuses_the_gate():
    model = build_model(replace(CFG, variant="notellm2"), corpus=CORPUS, seed=0)
    with pytest.raises(ValueError, match="fusion=concat"):
        fit_whitening(model, notes(4), progress=False)


def test_too_few_notes_or_no_pictures_leave_a_channel_unwhitened():
    model = build_model(replace(CFG, variant="notellm2", fusion="concat"), corpus=CORPUS, seed=0)
    assert fit_whitening(model, notes(20), progress=False) == {}  # 20 notes, 32-d channels
    blank = [replace(x, image=None) for x in notes(80)]  # a text-only collection
    stats = fit_whitening(model, blank, progress=False)
    assert set(stats) == {"text_mean", "text_white"}
    torch.testing.assert_close(model.fusion.image_white, torch.eye(model.fusion.image_white.shape[0]))
    np.testing.assert_allclose(np.linalg.norm(encode(model, blank, progress=False), axis=1), 1.0,
                               rtol=1e-5)
