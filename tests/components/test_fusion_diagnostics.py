"""Fusion diagnostics (components/evaluate/fusion.py): channel similarity of partners against
unrelated note pairs on hand-made vectors, and the text share of a tiny saved model."""

import numpy as np
import pandas as pd
import pytest

from components.evaluate.fusion import (
    channel_similarity,
    fusion_chart,
    fusion_markdown,
    text_share_by_slice,
    unrelated_pairs,
)


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def pairs_frame(rows):
    return pd.DataFrame({"query_id": [a for a, _ in rows], "target_id": [b for _, b in rows]})


def hand_made(n_pairs=40, n_single=20, d=128, seed=0):
    """Notes a<i>/b<i> form pair i; s<j> are unrelated singles. Text channel: a pair's two notes
    share one basis vector, every other note is orthogonal to them. Image channel: pure noise.
    Pairs 0..19 are the slice ``text_pairs``, 20..39 ``other_pairs``."""
    rng = np.random.default_rng(seed)
    ids = [f"a{i}" for i in range(n_pairs)] + [f"b{i}" for i in range(n_pairs)] + [
        f"s{j}" for j in range(n_single)]
    text = np.zeros((len(ids), d), np.float32)
    for i in range(n_pairs):
        text[i, i] = text[n_pairs + i, i] = 1.0
    for j in range(n_single):
        text[2 * n_pairs + j, n_pairs + j] = 1.0
    image = unit(rng.normal(size=(len(ids), d)))
    rows = [(f"a{i}", f"b{i}") for i in range(n_pairs)]
    test = pairs_frame(rows + [("a0", "zz_missing"), ("a1", "a1")])  # skipped: missing, self
    slices = {"text_pairs": pairs_frame(rows[:20]), "other_pairs": pairs_frame(rows[20:]),
              "short_query": pairs_frame(rows[:5])}
    return ids, {"text_only": text, "image_only": image}, test, slices, rows


def test_channel_statistics_equal_a_direct_computation():
    ids, vecs, test, slices, rows = hand_made()
    m, data = channel_similarity(vecs, ids, test, slices, sample=100_000)
    n = len(ids)
    pos = {x: i for i, x in enumerate(ids)}
    related = {frozenset((pos[a], pos[b])) for a, b in rows}
    # the sample exceeds the number of unrelated pairs: all of them, each once
    unrel = [(i, j) for i in range(n) for j in range(i + 1, n) if frozenset((i, j)) not in related]
    assert m["fusion/unrelated_pairs"] == len(unrel) == n * (n - 1) // 2 - len(rows)
    assert m["fusion/partner_pairs"] == len(rows)
    for probe, v in vecs.items():
        v = v.astype(np.float64)
        u = np.array([v[i] @ v[j] for i, j in unrel])
        p99 = np.percentile(u, 99)
        pre = f"fusion/{probe}/"
        assert m[pre + "unrelated_cos_mean"] == pytest.approx(u.mean(), abs=1e-9)
        assert m[pre + "unrelated_cos_std"] == pytest.approx(u.std(), abs=1e-9)
        assert m[pre + "unrelated_cos_p99"] == pytest.approx(p99, abs=1e-9)
        for name, sp in {"": test.iloc[:len(rows)], **slices}.items():
            c = np.array([v[pos[a]] @ v[pos[b]] for a, b in zip(sp["query_id"], sp["target_id"],
                                                                 strict=True)])
            key = pre + (f"slice/{name}/" if name else "")
            assert m[key + "partner_cos_mean"] == pytest.approx(c.mean(), abs=1e-9)
            assert m[key + "partner_above_p99"] == pytest.approx(np.mean(c > p99))
        np.testing.assert_allclose(np.sort(data["unrelated"][probe]), np.sort(u), atol=1e-9)
    # text: partners identical, unrelated notes orthogonal -> every partner above the p99
    assert m["fusion/text_only/partner_cos_mean"] == pytest.approx(1.0)
    assert m["fusion/text_only/unrelated_cos_mean"] == 0.0
    assert m["fusion/text_only/unrelated_cos_p99"] == 0.0
    assert m["fusion/text_only/slice/text_pairs/partner_above_p99"] == 1.0
    # image: noise -> partners look like unrelated pairs (chance: about 1 in 100 above the p99)
    assert m["fusion/image_only/partner_above_p99"] <= 0.1
    assert abs(m["fusion/image_only/partner_cos_mean"]) < 0.05


def test_sampled_unrelated_pairs_are_seeded_distinct_notes_and_never_partners():
    ids, vecs, test, slices, rows = hand_made()
    pos = {x: i for i, x in enumerate(ids)}
    related = {(min(pos[a], pos[b]), max(pos[a], pos[b])) for a, b in rows}
    idx = unrelated_pairs(len(ids), related, 500, seed=3)
    assert idx.shape == (500, 2)
    assert (idx[:, 0] < idx[:, 1]).all()
    assert not {tuple(p) for p in idx.tolist()} & related
    np.testing.assert_array_equal(idx, unrelated_pairs(len(ids), related, 500, seed=3))
    m1, _ = channel_similarity(vecs, ids, test, slices, sample=500, seed=1)
    m2, _ = channel_similarity(vecs, ids, test, slices, sample=500, seed=1)
    assert m1 == m2 and m1["fusion/unrelated_pairs"] == 500
    assert m1["fusion/text_only/unrelated_cos_mean"] == 0.0  # orthogonal in any sample
    assert m1["fusion/text_only/partner_above_p99"] == 1.0


def test_report_section_and_chart(tmp_path):
    ids, vecs, test, slices, _ = hand_made()
    m, data = channel_similarity(vecs, ids, test, slices)
    m |= {"fusion/text_share": 0.6, "fusion/text_share/slice/text_pairs": 0.7,
          "fusion/text_share_pairs": 40}
    text = "\n".join(fusion_markdown(m))
    assert "| channel | unrelated mean ± std | p99 | all | other_pairs | text_pairs |" in text
    assert "short_query" not in text.split("| set |")[0]  # length slices stay out of the table
    assert "| text | 0.000 ± 0.000 | 0.000 | 1.000 (1.00) |" in text
    assert "| text_pairs | 0.700 |" in text and "fusion_similarity.png" in text
    assert fusion_chart(data, m, str(tmp_path))
    assert (tmp_path / "fusion_similarity.png").stat().st_size > 0
    assert not fusion_chart(None, {}, str(tmp_path / "none"))


def test_evaluate_step_writes_the_diagnostics(tmp_path):
    """run(): fusion metrics beside the unchanged R@K keys, the report section, the chart."""
    from components.common.config import EvalConfig
    from components.common.readers import write_canonical
    from components.common.schema import NoteDataset
    from components.embed.run import write_vectors
    from components.evaluate.run import run

    ids, vecs, test, slices, rows = hand_made(n_pairs=12, n_single=6, d=32)
    notes = pd.DataFrame({"note_id": ids, "title": "", "content": "", "topics": [[]] * len(ids),
                          "image_uri": "", "category": "", "_file": "n.csv",
                          "_row": range(1, len(ids) + 1)})

    def canon(rs):
        return pairs_frame(rs).assign(score=1.0, _file="p.csv", _row=range(1, len(rs) + 1))

    write_canonical(NoteDataset(notes={"test": notes}, pairs={
        "test": canon(rows), "test_text_pairs": canon(rows[:6])}), str(tmp_path / "canon"))
    full = unit(vecs["text_only"] + vecs["image_only"])
    for name, v in (("notes", full), ("probe_text_only", vecs["text_only"]),
                    ("probe_image_only", vecs["image_only"])):
        write_vectors(pd.DataFrame({"note_id": ids, "vector": list(v)}),
                      str(tmp_path / "emb" / f"{name}.parquet"))
    m = run(str(tmp_path / "canon"), str(tmp_path / "emb"), str(tmp_path / "eval"),
            EvalConfig(ks=(1, 5)))
    assert {"R@1", "R@5", "probe/text_only/R@1", "slice/text_pairs/R@1"} <= set(m)
    assert m["fusion/text_only/slice/text_pairs/partner_above_p99"] == 1.0
    assert "fusion/text_only/slice/short_query/partner_cos_mean" in m  # every slice has keys
    assert "## Fusion diagnostics" in (tmp_path / "eval" / "report.md").read_text()
    assert (tmp_path / "eval" / "fusion_similarity.png").stat().st_size > 0
    # the UI's copies: every chart of report.md embedded, no relative image link left
    from components.evaluate.report import has_relative_images, inline_images

    md = (tmp_path / "eval" / "report.md").read_text()
    assert md.count("](") == 3 and has_relative_images(md)  # recall, probes × slices, fusion
    for text in (inline_images(md, str(tmp_path / "eval")),
                 (tmp_path / "eval" / "report.html").read_text()):
        assert text.count("data:image/png;base64,iVBOR") == 3, text[:200]
        assert not has_relative_images(text)
    assert "<h2>Fusion diagnostics</h2>" in (tmp_path / "eval" / "report.html").read_text()


@pytest.fixture(scope="module")
def tiny_notes(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("fusion_notes")
    rows = []
    for i in range(6):
        path = root / f"img{i}.png"
        Image.new("RGB", (40, 30), (40 * i, 200 - 30 * i, 9 * i)).save(path)
        rows.append({"note_id": f"n{i}", "title": f"title {i}",
                     "content": "bunny by the lake " * (i + 1), "topics": ["Pets"],
                     "image_uri": str(path) if i != 5 else ""})  # n5 has no image
    notes = pd.DataFrame(rows)
    test = pairs_frame([("n0", "n1"), ("n2", "n3"), ("n4", "n5"), ("n0", "gone")])
    return notes, test, {"both_pairs": pairs_frame([("n0", "n1"), ("n4", "n5")]),
                         "empty_pairs": pairs_frame([("gone", "n1")])}


@pytest.mark.parametrize("fusion", ["gate", "concat"])
def test_text_share_of_a_tiny_saved_model(fusion, tiny_notes, tmp_path):
    import torch

    from model import ModelConfig, NoteLLM2, build_model

    cfg = ModelConfig(image_size=32, num_query_tokens=4, max_tokens=64, tiny_vocab_size=400,
                      qformer_layers=1, qformer_hidden_size=32, qformer_heads=2,
                      qformer_cross_attention_frequency=1, fusion=fusion)
    model = build_model(cfg, corpus=["fluffy bunny at the lake"] * 3, seed=0)
    if fusion == "concat":
        with torch.no_grad():
            model.fusion.text_logit.fill_(0.8)  # away from the initial 0.5 share
    model.save_pretrained(str(tmp_path / "m"))
    notes, test, slices = tiny_notes
    m = text_share_by_slice(str(tmp_path / "m"), notes, test, slices, n_pairs=2)
    assert set(m) == {"fusion/text_share", "fusion/text_share/slice/both_pairs",
                      "fusion/text_share_pairs"}
    assert m["fusion/text_share_pairs"] == 2  # n_pairs caps the sample of the 3 usable pairs
    shares = [m["fusion/text_share"], m["fusion/text_share/slice/both_pairs"]]
    if fusion == "gate":
        assert all(0 < s < 1 for s in shares)
    else:
        saved = NoteLLM2.from_pretrained(str(tmp_path / "m"))
        w = torch.sigmoid(saved.fusion.text_logit).detach()
        assert float(w) == pytest.approx(0.68997, abs=1e-4)
        assert shares == [pytest.approx(float(w), abs=1e-6)] * 2


def test_no_text_share_without_late_fusion(tiny_notes, tmp_path):
    from model import ModelConfig, build_model

    cfg = ModelConfig(variant="text_only", max_tokens=64, tiny_vocab_size=400)
    build_model(cfg, corpus=["fluffy bunny at the lake"] * 3, seed=0).save_pretrained(
        str(tmp_path / "m"))
    notes, test, slices = tiny_notes
    assert text_share_by_slice(str(tmp_path / "m"), notes, test, slices) == {}
