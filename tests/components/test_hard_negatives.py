"""One-modality look-alikes: found on hand-made notes, never a partner, never a test note; and
the look-alike data set the demo generator writes to measure fusion."""

import csv

import numpy as np
import pytest
from PIL import Image, ImageDraw

from components.common.readers import read_dataset, write_canonical
from components.train.data import TrainData
from components.train.hard_negatives import (
    image_features,
    mine,
    one_modality_look_alikes,
    text_features,
)
from pipelines.demo_data import make_demo_data, parse_kinds


def _picture(seed: int, jitter: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (48, 48), tuple(int(c) for c in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(3):
        x, y = (int(v) + jitter for v in rng.integers(4, 36, 2))
        d.ellipse([x, y, x + 12, y + 12], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return im


def _notes():
    """0 anchor, 1 its partner (same words and picture), 2 same words / other picture,
    3 same picture / other words, 4-9 unrelated."""
    words = "Kalomi teapot near Renzu, vintage porcelain #Kalomi"
    texts = [words, words + " again", words + " sale", "sunny beach volleyball at noon"]
    pics = [_picture(1), _picture(1, jitter=1), _picture(2), _picture(1, jitter=2)]
    for i in range(6):
        texts.append(f"note {i} about {['cake', 'lake', 'run', 'desk', 'hat', 'tea'][i]} "
                     f"{'xyz'[i % 3]}")
        pics.append(_picture(10 + i))
    return texts, pics


def test_the_look_alikes_match_the_anchor_in_one_modality_only():
    texts, pics = _notes()
    found = mine([0], [1], texts.__getitem__, pics.__getitem__, range(len(texts)))
    assert found == {0: (2, 3)}  # words-only twin, picture-only twin; the partner never


def test_features_are_unit_rows_and_see_what_they_should():
    texts, pics = _notes()
    t, v = text_features(texts).toarray(), image_features([*pics, None])
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, rtol=1e-5)
    assert np.all(v[-1] == 0)  # no image: similar to nothing
    assert t[0] @ t[2] > 0.5 > t[0] @ t[3]
    assert v[0] @ v[3] > 0.5 > v[0] @ v[2]


def test_sparse_text_features_equal_the_dense_definition():
    """Sparse rows are the dense hashed TF-IDF: signed log-tf per bucket, summed, times idf,
    unit length; buckets whose terms cancel count in no note's df."""
    import zlib

    texts = ["a b a c", "b c d", "a", "", "d d d e"]
    dim = 8
    x = np.zeros((len(texts), dim))
    for i, text in enumerate(texts):
        words = text.split()
        for w in set(words):
            h = zlib.crc32(w.encode())
            x[i, h % dim] += (1.0 if (h >> 31) & 1 else -1.0) * (1 + np.log(words.count(w)))
    x *= np.log((1 + len(texts)) / (1 + (x != 0).sum(axis=0))) + 1.0
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    got = text_features(texts, dim=dim)
    assert got.shape == (5, dim) and got.nnz == np.count_nonzero(x)
    np.testing.assert_allclose(got.toarray(), x, atol=1e-6)


def test_excluded_rows_and_the_anchor_are_never_chosen():
    rng = np.random.default_rng(0)
    t = rng.standard_normal((30, 8)).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    v = t.copy()  # both modalities alike: every candidate matches in both
    v[:, :4] *= -1
    out = one_modality_look_alikes([0, 1], t, v, {0: {5, 6}, 1: set()})
    assert 0 not in out[0] and not {5, 6} & set(out[0]) and 1 not in out[1]


def test_training_mines_among_training_notes_only(demo_dir, tmp_path):
    canon = str(tmp_path / "canon")
    write_canonical(read_dataset(demo_dir), canon)
    data = TrainData.load(canon)
    found = data.look_alikes(pool_size=10_000, seed=0)
    partners = {}
    for q, t in zip(data.train["query_id"], data.train["target_id"], strict=True):
        partners.setdefault(data.row_of[q], set()).add(data.row_of[t])
    assert set(found) == set(partners)
    for a, alikes in found.items():
        assert all(x in data.train_keys and x != a and x not in partners[a] for x in alikes)
    small = data.look_alikes(pool_size=20, seed=0)  # a sampled pool still covers every anchor
    assert set(small) == set(found)


def _csv(path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def test_the_look_alike_data_set(tmp_path):
    counts = make_demo_data(str(tmp_path), notes=60, seed=1, kinds=parse_kinds("both=1"),
                            one_modality_distractors=True)
    assert counts["one_modality_look_alikes"] == 2 * (counts["pairs_train"] + counts["pairs_val"]
                                                      + counts["pairs_test"])
    rows = {r[0]: r for name in ("notes_train.csv", "notes_test.csv") for r in _csv(tmp_path / name)}
    a, b = _csv(tmp_path / "note_pairs_test.csv")[0]
    i = int(a[1:])
    img_twin, text_twin = f"t{i + 2:06d}", f"t{i + 3:06d}"
    name = rows[a][1].split()[0]  # the distinctive invented name leads the title
    assert name in rows[text_twin][2] and name not in rows[img_twin][1] + rows[img_twin][2]
    assert name in rows[b][2]
    with pytest.raises(ValueError, match="unknown pair kind"):
        parse_kinds("both=1,sideways=1")
    with pytest.raises(ValueError, match="not a number"):
        parse_kinds("both=lots")
