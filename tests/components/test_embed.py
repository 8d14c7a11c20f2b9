"""The embed step: shards that merge into exactly the unsharded result, and refusals."""

import json

import numpy as np
import pytest

from components.common.config import resolve
from components.common.readers import read_dataset, write_canonical
from components.embed.run import merge, read_vectors, run, shard_bounds
from model import build_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, request):
    from pipelines.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("embed")
    make_demo_data(str(root / "raw"), notes=40, seed=5)
    write_canonical(read_dataset(str(root / "raw")), str(root / "canon"))
    cfg = resolve("tiny", ["embed.batch_size=4"])
    model = build_model(cfg.model, corpus=["a tiny corpus for the tokenizer"] * 4, seed=0)
    model.save_pretrained(str(root / "model"))
    return root, cfg


@pytest.mark.parametrize("n, shards", [(10, 3), (2, 4), (0, 2), (7, 1)])
def test_shard_bounds_cover_every_row_once(n, shards):
    spans = [shard_bounds(n, i, shards) for i in range(shards)]
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    sizes = [b - a for a, b in spans]
    assert max(sizes) - min(sizes) <= 1


def test_sharded_embedding_equals_unsharded(setup):
    root, cfg = setup
    canon, model = str(root / "canon"), str(root / "model")
    run(canon, model, str(root / "whole"), cfg, progress=False)
    parts = [str(root / f"part{i}") for i in range(3)]
    for i, p in enumerate(parts):
        run(canon, model, p, cfg, progress=False, shard_index=i, num_shards=3)
    merge(parts[::-1], str(root / "merged"))  # any order in, shard order out
    for name in ("notes", "probe_text_only", "probe_image_only"):
        t1, v1 = read_vectors(str(root / "whole" / f"{name}.parquet"))
        t2, v2 = read_vectors(str(root / "merged" / f"{name}.parquet"))
        assert t1["note_id"].tolist() == t2["note_id"].tolist()
        # a note's vector does not depend on its batch neighbours (model invariant), so the
        # shards agree with the whole run up to float rounding
        np.testing.assert_allclose(v2, v1, atol=1e-5)
    whole = np.load(root / "whole" / "vectors.npy")
    np.testing.assert_array_equal(np.load(root / "merged" / "vectors.npy"),
                                  read_vectors(str(root / "merged" / "notes.parquet"))[1])
    assert whole.shape == np.load(root / "merged" / "vectors.npy").shape
    assert json.loads((root / "merged" / "embed.json").read_text())["shards"] == 3


def test_merge_refuses_missing_or_repeated_shards(setup):
    root, cfg = setup
    canon, model = str(root / "canon"), str(root / "model")
    parts = [str(root / f"p{i}") for i in range(2)]
    for i, p in enumerate(parts):
        run(canon, model, p, cfg, progress=False, probes=False, shard_index=i, num_shards=2)
    with pytest.raises(ValueError, match=r"shard indexes \[0\] of \[2\]"):
        merge(parts[:1], str(root / "m1"))
    with pytest.raises(ValueError, match=r"shard indexes \[1, 1\]"):
        merge([parts[1], parts[1]], str(root / "m2"))


def test_pixel_cache_gives_the_same_vectors_and_decodes_each_image_once(setup):
    from components.common.canonical import load_canonical
    from components.common.notes import LazyNotes, PixelCache
    from model import NoteLLM2, encode
    from model.collator import NoteCollator

    root, _ = setup
    notes, _, _ = load_canonical(str(root / "canon"))
    model = NoteLLM2.from_pretrained(str(root / "model"))
    lazy = LazyNotes(notes["test"].head(6))
    cache = PixelCache(lazy, NoteCollator(model), 2**30)
    for probe in (None, "image_only", "text_only"):  # the embed step's three passes
        want = encode(model, lazy, batch_size=4, probe=probe, progress=False)
        got = encode(model, lazy, batch_size=4, probe=probe, progress=False, pixels=cache.get)
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert cache.kept == len(lazy) and cache.decoded == len(lazy)  # once, in the first pass
