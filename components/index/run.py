"""index: a FAISS index over the note vectors (inner product on unit vectors), with its id map
and a recall check against exact search."""

from __future__ import annotations

import json
import logging
import os
import tempfile

import numpy as np

from components.common import storage
from components.common.config import IndexConfig
from components.common.readers import write_table
from components.embed.run import read_vectors

log = logging.getLogger(__name__)


def build(vectors: np.ndarray, factory: str):
    import faiss

    d = vectors.shape[1]
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    return index


def recall_vs_exact(index, vectors: np.ndarray, k: int = 10, queries: int = 200,
                    seed: int = 0) -> float:
    """Share of the exact top-k (IndexFlatIP) that the index returns, on sampled queries."""
    import faiss

    if len(vectors) == 0:
        return 1.0
    rng = np.random.default_rng(seed)
    q = vectors[rng.choice(len(vectors), size=min(queries, len(vectors)), replace=False)]
    k = min(k, len(vectors))
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(q, k)
    _, got = index.search(q, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, got, strict=True)]))


def run(embeddings_dir: str, out_dir: str, cfg: IndexConfig) -> dict:
    import faiss

    table, vectors = read_vectors(storage.join(embeddings_dir, "notes.parquet"))
    dup = table["note_id"][table["note_id"].duplicated()]
    if len(dup):
        raise ValueError(f"duplicate note id(s) in the embeddings: {', '.join(dup[:5])}")
    index = build(np.ascontiguousarray(vectors), cfg.factory)
    recall = recall_vs_exact(index, vectors)
    meta = {"factory": cfg.factory, "metric": "inner_product", "dim": int(vectors.shape[1]),
            "ntotal": int(index.ntotal), "recall@10_vs_exact": recall}
    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index, os.path.join(tmp, "index.faiss"))
        with open(os.path.join(tmp, "index.faiss"), "rb") as f:
            storage.write_bytes(storage.join(out_dir, "index.faiss"), f.read())
    write_table(table[["note_id"]].assign(position=np.arange(len(table))),
                storage.join(out_dir, "ids.parquet"))
    storage.write_text(storage.join(out_dir, "index.json"), json.dumps(meta, indent=2))
    log.info("index %s over %d vectors, recall@10 vs exact %.3f", cfg.factory, index.ntotal, recall)
    return meta
