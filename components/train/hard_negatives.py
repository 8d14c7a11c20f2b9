"""Hard negatives that match a note in one modality only, mined from raw features.

In-batch negatives are random notes: they rarely share a picture or wording with the anchor,
so nothing in the loss tells a fused vector that a match in one modality is weaker evidence
than a match in both. For the query note of every training pair this module finds

* a **text look-alike**: among the notes whose wording is closest to the anchor's, the one whose
  picture is least like it (largest text similarity minus image similarity), and
* an **image look-alike**: the same with the modalities swapped,

from features that need no model: hashed word uni- and bigram TF-IDF of title, content and
topics, and a 12 x 12 colour thumbnail centred on the collection's mean thumbnail. Training
adds both look-alikes of each pair's query as extra negatives of every anchor in the batch (see
:func:`model.loss.info_nce`). The anchor's own partners (every training pair it is in) are never
chosen. The features are crude on purpose: they only have to find notes that look alike in one
modality, not related ones, and a look-alike that is in fact related is as likely as a random
in-batch note being one.
"""

from __future__ import annotations

import io
import logging
import math
import re
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

TEXT_DIM = 4096
THUMB = 12
WORD = re.compile(r"\w+", re.UNICODE)


def _tokens(text: str) -> list[str]:
    words = WORD.findall(text.lower())
    return words


def text_features(texts: Sequence[str], dim: int = TEXT_DIM):
    """(N, dim) float32 unit rows as a sparse CSR matrix: signed feature hashing of word uni-
    and bigrams, log term frequency times inverse document frequency. Deterministic (CRC32
    hashing). Sparse because a note has tens of terms in thousands of buckets: at 63,500 notes
    the dense matrix was 1 GB and products against the pool cost N·dim each."""
    from scipy import sparse

    rows, cols, vals = [], [], []
    for i, text in enumerate(texts):
        counts: dict[str, int] = {}
        for tok in _tokens(text):
            counts[tok] = counts.get(tok, 0) + 1
        for tok, c in counts.items():
            h = zlib.crc32(tok.encode("utf-8"))
            rows.append(i)
            cols.append(h % dim)
            vals.append((1.0 if (h >> 31) & 1 else -1.0) * (1.0 + math.log(c)))
    x = sparse.csr_matrix((np.array(vals, dtype=np.float32),
                           (np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64))),
                          shape=(len(texts), dim), dtype=np.float32)  # duplicates summed
    x.eliminate_zeros()  # a bucket whose signed terms cancel is empty, as in a dense sum
    df = np.bincount(x.indices, minlength=dim)  # (dim,) notes with the bucket
    x = x @ sparse.diags((np.log((1 + len(texts)) / (1 + df)) + 1.0).astype(np.float32))
    norm = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())  # (N,)
    inv = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0).astype(np.float32)
    return sparse.csr_matrix(sparse.diags(inv) @ x, dtype=np.float32)


def _similarities(x, rows: np.ndarray) -> np.ndarray:
    """(len(rows), N) dense inner products of rows ``rows`` of ``x`` (dense or sparse) with
    every row."""
    out = x[rows] @ x.T
    return out.toarray() if hasattr(out, "toarray") else out


def image_features(images: Sequence[Image.Image | None], size: int = THUMB) -> np.ndarray:
    """(N, 3 size²) float32 unit rows: colour thumbnails minus the mean thumbnail; a note
    without an image gets a zero row (similar to nothing)."""
    x = np.zeros((len(images), 3 * size * size), dtype=np.float32)
    present = np.zeros(len(images), dtype=bool)
    for i, im in enumerate(images):
        if im is None:
            continue
        thumb = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        x[i] = np.asarray(thumb, dtype=np.float32).reshape(-1) / 255.0
        present[i] = True
    if present.any():
        x[present] -= x[present].mean(axis=0)
    x[~present] = 0.0
    return _unit(x)


def thumbnail(data: bytes, size: int = THUMB) -> Image.Image:
    """A small RGB picture from encoded image bytes; JPEGs are decoded at reduced scale
    (``draft``), which is what makes mining a large pool affordable."""
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (4 * size, 4 * size))
        return im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def one_modality_look_alikes(anchors: Sequence[int], text: np.ndarray, image: np.ndarray,
                             exclude: dict[int, set[int]], *, chunk: int = 1024) -> np.ndarray:
    """(len(anchors), 2) rows ``[text look-alike, image look-alike]``, as row numbers of the
    feature matrices. ``exclude[a]``: rows that may not be chosen for anchor ``a`` (its
    partners); the anchor itself is never chosen. A row that is among the anchor's nearest
    10 % in the other modality does not match in one modality only: of the rest, the nearest in
    the modality looked at wins."""
    anchors = np.asarray(anchors, dtype=np.int64)
    n = text.shape[0]
    if n < 2:
        raise ValueError("mining look-alikes needs at least two notes")
    out = np.empty((len(anchors), 2), dtype=np.int64)
    for s in range(0, len(anchors), chunk):
        a = anchors[s:s + chunk]
        st, si = _similarities(text, a), _similarities(image, a)  # (c, n) each
        for col, (same, other) in enumerate(((st, si), (si, st))):
            score = same.copy()
            score[np.arange(len(a)), a] = -np.inf
            for r, row in enumerate(a):
                bad = exclude.get(int(row))
                if bad:
                    score[r, list(bad)] = -np.inf
            # alike in the other modality too: not a one-modality look-alike
            score[other >= np.quantile(other, 0.9, axis=1, keepdims=True)] = -np.inf
            best = score.argmax(axis=1)
            if not np.isfinite(score[np.arange(len(a)), best]).all():
                raise ValueError("no note is left to mine a look-alike from; the pool is too "
                                 "small")
            out[s:s + len(a), col] = best
    return out


def mine(keys_a: Sequence[int], keys_b: Sequence[int], texts: Callable[[int], str],
         images: Callable[[int], Image.Image | None], pool: Sequence[int], *, threads: int = 8
         ) -> dict[int, tuple[int, int]]:
    """Look-alikes of every query note ``keys_a`` of the training pairs ``(a, b)``, chosen from
    the notes ``pool`` (note keys); returns ``{a: (text look-alike, image look-alike)}``."""
    pool = list(dict.fromkeys([*keys_a, *keys_b, *pool]))
    where = {k: i for i, k in enumerate(pool)}
    partners: dict[int, set[int]] = {}
    for a, b in zip(keys_a, keys_b, strict=True):
        partners.setdefault(where[a], set()).add(where[b])
        partners.setdefault(where[b], set()).add(where[a])
    log.info("mining one-modality look-alikes for %d anchors among %d notes",
             len(set(keys_a)), len(pool))
    t = text_features([texts(k) for k in pool])
    with ThreadPoolExecutor(max_workers=threads) as ex:  # decoding releases the GIL
        v = image_features(list(ex.map(images, pool)))
    anchors = list(dict.fromkeys(keys_a))
    found = one_modality_look_alikes([where[a] for a in anchors], t, v, partners)
    return {a: (pool[int(x)], pool[int(y)]) for a, (x, y) in zip(anchors, found, strict=True)}
