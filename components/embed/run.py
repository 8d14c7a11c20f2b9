"""embed: note vectors from the exported model, plus modality-probe vectors of the test notes.

Writes ``notes.parquet`` (note_id, split, vector), ``vectors.npy`` (float32, same order),
``probe_<name>.parquet`` for each probe and ``embed.json``. With ``num_shards > 1`` each task
embeds the contiguous shard ``shard_index`` of the notes (in canonical order) and :func:`merge`
concatenates the shard folders, so the merged folder equals an unsharded run.
"""

from __future__ import annotations

import io
import json
import logging
import time

import numpy as np
import pandas as pd
import pyarrow as pa

from components.common import storage
from components.common.canonical import load_canonical
from components.common.config import RunConfig
from components.common.notes import LazyNotes, configure_images
from model import NoteLLM2, encode
from model.collator import PROBES

log = logging.getLogger(__name__)


def vectors_table(ids: list[str], vectors: np.ndarray, **extra) -> pd.DataFrame:
    df = pd.DataFrame({"note_id": ids, **extra})
    df["vector"] = list(vectors.astype(np.float32))
    return df


def write_vectors(df: pd.DataFrame, uri: str, dim: int = 0) -> None:
    """Parquet with ``vector`` as a fixed-size float32 list, so readers get an (N, d) matrix;
    ``dim`` gives the width of an empty table."""
    mat = np.stack(df["vector"].to_numpy()) if len(df) else np.zeros((0, max(1, dim)), np.float32)
    d = mat.shape[1]
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


def shard_bounds(n: int, shard_index: int, num_shards: int) -> tuple[int, int]:
    """[start, stop) of shard ``shard_index`` of ``n`` rows, sizes differing by at most one."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} outside [0, {num_shards})")
    base, extra = divmod(n, num_shards)
    start = shard_index * base + min(shard_index, extra)
    return start, start + base + (shard_index < extra)


def _write(out_dir: str, table: pd.DataFrame, vecs: np.ndarray,
           probes: dict[str, tuple[list[str], np.ndarray]], meta: dict) -> None:
    dim = vecs.shape[1]
    write_vectors(vectors_table(table["note_id"].tolist(), vecs, split=table["split"].tolist()),
                  storage.join(out_dir, "notes.parquet"), dim)
    buf = io.BytesIO()
    np.save(buf, vecs.astype(np.float32), allow_pickle=False)
    storage.write_bytes(storage.join(out_dir, "vectors.npy"), buf.getvalue())
    for probe, (ids, pv) in probes.items():
        write_vectors(vectors_table(ids, pv), storage.join(out_dir, f"probe_{probe}.parquet"), dim)
    storage.write_text(storage.join(out_dir, "embed.json"), json.dumps(meta, indent=2))


def run(canonical_dir: str, model_dir: str, out_dir: str, cfg: RunConfig, *,
        probes: bool = True, progress: bool = True, shard_index: int = 0,
        num_shards: int = 1) -> dict[str, float]:
    configure_images(cfg.data)
    notes, _, _ = load_canonical(canonical_dir)
    with storage.local_copy(model_dir) as local:
        model = NoteLLM2.from_pretrained(local)
    frames = [df.assign(split=s) for s, df in notes.items()
              if cfg.embed.scope == "all" or s == "test"]
    table = pd.concat(frames, ignore_index=True)
    start, stop = shard_bounds(len(table), shard_index, num_shards)
    table = table.iloc[start:stop].reset_index(drop=True)
    t0 = time.perf_counter()
    vecs = encode(model, LazyNotes(table), batch_size=cfg.embed.batch_size, progress=progress)
    seconds = time.perf_counter() - t0
    rate = len(table) / max(1e-9, seconds)
    log.info("embedded %d notes (shard %d of %d, %.1f notes/s)", len(table), shard_index,
             num_shards, rate)
    probe_vecs = {}
    if probes and "test" in notes:
        test = table[table["split"] == "test"].reset_index(drop=True)
        for probe in PROBES:
            pv = encode(model, LazyNotes(test), batch_size=cfg.embed.batch_size, probe=probe,
                        progress=progress, desc=f"embed {probe}")
            probe_vecs[probe] = (test["note_id"].tolist(), pv)
    meta = {"shard_index": shard_index, "num_shards": num_shards, "notes": len(table),
            "dim": int(vecs.shape[1]) if vecs.ndim == 2 else 0, "seconds": round(seconds, 3),
            "notes_per_s": round(rate, 2), "probes": sorted(probe_vecs)}
    _write(out_dir, table, vecs, probe_vecs, meta)
    return {"embed/notes": len(table), "embed/notes_per_s": rate}


def merge(shard_dirs: list[str], out_dir: str) -> dict[str, float]:
    """Concatenate shard folders in shard order into one embeddings folder. Refuses a missing
    or repeated shard, mixed shard counts, differing dimensions and duplicate note ids."""
    metas = [json.loads(storage.read_text(storage.join(d, "embed.json"))) for d in shard_dirs]
    counts = {m["num_shards"] for m in metas}
    found = sorted(m["shard_index"] for m in metas)
    if len(counts) != 1 or found != list(range(counts.pop())):
        raise ValueError(f"embedding shards do not fit together: got shard indexes {found} of "
                         f"{sorted({m['num_shards'] for m in metas})} shard(s)")
    order = sorted(range(len(metas)), key=lambda i: metas[i]["shard_index"])
    parts = [read_vectors(storage.join(shard_dirs[i], "notes.parquet")) for i in order]
    dims = {v.shape[1] for _, v in parts if len(v)}
    if len(dims) > 1:
        raise ValueError(f"embedding shards have different dimensions: {sorted(dims)}")
    table = pd.concat([t for t, _ in parts], ignore_index=True)
    vecs = np.concatenate([v for _, v in parts]) if parts else np.zeros((0, 0), np.float32)
    dup = table["note_id"][table["note_id"].duplicated()]
    if len(dup):
        raise ValueError(f"note id(s) embedded by more than one shard: {', '.join(dup[:5])}")
    probes = {}
    for probe in set.intersection(*(set(m["probes"]) for m in metas)):
        pp = [read_vectors(storage.join(shard_dirs[i], f"probe_{probe}.parquet")) for i in order]
        probes[probe] = ([n for t, _ in pp for n in t["note_id"]],
                         np.concatenate([v for _, v in pp]))
    seconds = sum(m["seconds"] for m in metas)
    meta = {"shards": len(metas), "notes": len(table), "dim": int(vecs.shape[1]),
            "seconds_total": round(seconds, 3), "probes": sorted(probes),
            "notes_per_s_per_shard": [m["notes_per_s"] for m in (metas[i] for i in order)]}
    _write(out_dir, table, vecs, probes, {**meta, "shard_index": 0, "num_shards": 1,
                                          "seconds": round(seconds, 3)})
    log.info("merged %d shard(s): %d notes", len(metas), len(table))
    return {"embed/notes": len(table), "embed/shards": len(metas)}
