"""embed: note vectors from the exported model, plus modality-probe vectors of the test notes.

Writes ``notes.parquet`` (note_id, split, vector), ``vectors.npy`` (float32, same order) and
``probe_<name>.parquet`` for each probe.
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pandas as pd
import pyarrow as pa

from components.common import storage
from components.common.canonical import load_canonical
from components.common.config import RunConfig
from components.common.notes import LazyNotes
from model import NoteLLM2, encode
from model.collator import PROBES

log = logging.getLogger(__name__)


def vectors_table(ids: list[str], vectors: np.ndarray, **extra) -> pd.DataFrame:
    df = pd.DataFrame({"note_id": ids, **extra})
    df["vector"] = list(vectors.astype(np.float32))
    return df


def write_vectors(df: pd.DataFrame, uri: str) -> None:
    """Parquet with ``vector`` as a fixed-size float32 list, so readers get an (N, d) matrix."""
    mat = np.stack(df["vector"].to_numpy()) if len(df) else np.zeros((0, 0), np.float32)
    d = mat.shape[1] if mat.ndim == 2 else 0
    table = pa.Table.from_pandas(df.drop(columns="vector"), preserve_index=False)
    table = table.append_column("vector", pa.FixedSizeListArray.from_arrays(
        pa.array(mat.reshape(-1), type=pa.float32()), d))
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def read_vectors(uri: str) -> tuple[pd.DataFrame, np.ndarray]:
    """(table without vectors, (N, d) float32 matrix)."""
    import pyarrow.parquet as pq

    with storage.local_copy(uri) as local:
        table = pq.read_table(local)
    col = table.column("vector").combine_chunks()
    d = col.type.list_size if hasattr(col.type, "list_size") else len(col[0])
    mat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)
    return table.drop(["vector"]).to_pandas(), mat


def run(canonical_dir: str, model_dir: str, out_dir: str, cfg: RunConfig, *,
        probes: bool = True, progress: bool = True) -> dict[str, float]:
    notes, _, _ = load_canonical(canonical_dir)
    with storage.local_copy(model_dir) as local:
        model = NoteLLM2.from_pretrained(local)
    frames = [df.assign(split=s) for s, df in notes.items()
              if cfg.embed.scope == "all" or s == "test"]
    table = pd.concat(frames, ignore_index=True)
    t0 = time.perf_counter()
    vecs = encode(model, LazyNotes(table), batch_size=cfg.embed.batch_size, progress=progress)
    rate = len(table) / max(1e-9, time.perf_counter() - t0)
    log.info("embedded %d notes (%.1f notes/s)", len(table), rate)
    write_vectors(vectors_table(table["note_id"].tolist(), vecs, split=table["split"].tolist()),
                  storage.join(out_dir, "notes.parquet"))
    buf = io.BytesIO()
    np.save(buf, vecs, allow_pickle=False)
    storage.write_bytes(storage.join(out_dir, "vectors.npy"), buf.getvalue())
    if probes and "test" in notes:
        test = notes["test"]
        for probe in PROBES:
            pv = encode(model, LazyNotes(test), batch_size=cfg.embed.batch_size, probe=probe,
                        progress=progress, desc=f"embed {probe}")
            write_vectors(vectors_table(test["note_id"].tolist(), pv),
                          storage.join(out_dir, f"probe_{probe}.parquet"))
    return {"embed/notes": len(table), "embed/notes_per_s": rate}
