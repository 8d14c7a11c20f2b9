"""embed: note vectors from the exported model, plus modality-probe vectors of the test notes.

Writes ``notes.parquet`` (note_id, split, vector), ``vectors.npy`` (float32, same order),
``probe_<name>.parquet`` for each probe and ``embed.json``. With ``num_shards > 1`` each task
embeds the contiguous shard ``shard_index`` of the notes (in canonical order) and :func:`merge`
concatenates the shard folders, so the merged folder equals an unsharded run.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa

from components.common import storage
from components.common.canonical import load_canonical
from components.common.config import RunConfig
from components.common.notes import LazyNotes, PixelCache, configure_images
from model import NoteLLM2, encode
from model.collator import PROBES, NoteCollator

log = logging.getLogger(__name__)

ROW_GROUP = 65536  # vectors per Parquet row group (16 MiB at d = 64)


def vectors_table(ids: list[str], vectors: np.ndarray, **extra) -> pd.DataFrame:
    df = pd.DataFrame({"note_id": ids, **extra})
    df["vector"] = list(vectors.astype(np.float32))
    return df


def write_vectors(df: pd.DataFrame, uri: str, dim: int = 0) -> None:
    """Parquet with ``vector`` as a fixed-size float32 list, so readers get an (N, d) matrix;
    ``dim`` gives the width of an empty table."""
    mat = np.stack(df["vector"].to_numpy()) if len(df) else np.zeros((0, max(1, dim)), np.float32)
    write_matrix(uri, {c: df[c].tolist() for c in df.columns if c != "vector"}, mat)


def _arrow(columns: dict[str, list], mat: np.ndarray) -> pa.Table:
    """The table of ``columns`` and ``vector`` viewing the (N, d) float32 ``mat`` (no copy)."""
    mat = np.ascontiguousarray(mat, dtype=np.float32)
    vector = pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1)), mat.shape[1])
    return pa.table({**{c: pa.array(v) if len(v) else pa.array([], pa.string())
                        for c, v in columns.items()}, "vector": vector})


def write_matrix(uri: str, columns: dict[str, list], mat: np.ndarray) -> None:
    """``write_vectors`` from string ``columns`` and an (N, d) matrix: written to disk (and
    streamed up for gs://) in row groups, with no per-row Python objects or in-memory file."""
    import pyarrow.parquet as pq

    with storage.local_target(uri) as local:
        pq.write_table(_arrow(columns, mat), local, row_group_size=ROW_GROUP)


def read_vectors(uri: str) -> tuple[pd.DataFrame, np.ndarray]:
    """(table without vectors, (N, d) float32 matrix)."""
    import pyarrow.parquet as pq

    with storage.local_copy(uri) as local:
        table = pq.read_table(local)
    return table.drop(["vector"]).to_pandas(), _matrix(table)


def _matrix(table: pa.Table) -> np.ndarray:
    col = table.column("vector").combine_chunks()
    d = col.type.list_size if hasattr(col.type, "list_size") else len(col[0])
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)


def shard_bounds(n: int, shard_index: int, num_shards: int) -> tuple[int, int]:
    """[start, stop) of shard ``shard_index`` of ``n`` rows, sizes differing by at most one."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} outside [0, {num_shards})")
    base, extra = divmod(n, num_shards)
    start = shard_index * base + min(shard_index, extra)
    return start, start + base + (shard_index < extra)


def _write(out_dir: str, table: pd.DataFrame, vecs: np.ndarray,
           probes: dict[str, tuple[list[str], np.ndarray]], meta: dict) -> None:
    write_matrix(storage.join(out_dir, "notes.parquet"),
                 {"note_id": table["note_id"].tolist(), "split": table["split"].tolist()}, vecs)
    with storage.local_target(storage.join(out_dir, "vectors.npy")) as local:
        np.save(local, vecs.astype(np.float32, copy=False), allow_pickle=False)
    for probe, (ids, pv) in probes.items():
        write_matrix(storage.join(out_dir, f"probe_{probe}.parquet"), {"note_id": ids}, pv)
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
    lazy = LazyNotes(table)
    test_rows = np.flatnonzero(table["split"].to_numpy() == "test")  # what the probes encode
    pixels = None
    if model.vision is not None:  # one pixel budget for the process; only probed notes kept
        keep = np.zeros(len(table), dtype=bool)
        keep[test_rows] = probes
        pixels = PixelCache(lazy, NoteCollator(model), int(cfg.embed.pixel_cache_mb * 2**20),
                            keep=keep).get
    t0 = time.perf_counter()
    vecs = encode(model, lazy, batch_size=cfg.embed.batch_size, progress=progress,
                  pixels=pixels)
    seconds = time.perf_counter() - t0
    rate = len(table) / max(1e-9, seconds)
    log.info("embedded %d notes (shard %d of %d, %.1f notes/s)", len(table), shard_index,
             num_shards, rate)
    probe_vecs = {}
    if probes and "test" in notes:
        test = table.iloc[test_rows].reset_index(drop=True)
        for probe in PROBES:
            pv = encode(model, LazyNotes(test), batch_size=cfg.embed.batch_size, probe=probe,
                        progress=progress, desc=f"embed {probe}",
                        pixels=pixels and (lambda idx: pixels(test_rows[idx])))
            probe_vecs[probe] = (test["note_id"].tolist(), pv)
    meta = {"shard_index": shard_index, "num_shards": num_shards, "notes": len(table),
            "dim": int(vecs.shape[1]) if vecs.ndim == 2 else 0, "seconds": round(seconds, 3),
            "notes_per_s": round(rate, 2), "probes": sorted(probe_vecs)}
    _write(out_dir, table, vecs, probe_vecs, meta)
    return {"embed/notes": len(table), "embed/notes_per_s": rate}


def merge(shard_dirs: list[str], out_dir: str) -> dict[str, float]:
    """Concatenate shard folders in shard order into one embeddings folder, one shard in memory
    at a time. Refuses a missing or repeated shard, mixed shard counts, differing dimensions and
    duplicate note ids."""
    metas = [json.loads(storage.read_text(storage.join(d, "embed.json"))) for d in shard_dirs]
    counts = {m["num_shards"] for m in metas}
    found = sorted(m["shard_index"] for m in metas)
    if len(counts) != 1 or found != list(range(counts.pop())):
        raise ValueError(f"embedding shards do not fit together: got shard indexes {found} of "
                         f"{sorted({m['num_shards'] for m in metas})} shard(s)")
    order = [shard_dirs[i] for i in sorted(range(len(metas)),
                                           key=lambda i: metas[i]["shard_index"])]
    dims = {m["dim"] for m in metas if m["notes"]}
    if len(dims) > 1:
        raise ValueError(f"embedding shards have different dimensions: {sorted(dims)}")
    dim = dims.pop() if dims else max(m["dim"] for m in metas)
    total = sum(m["notes"] for m in metas)
    seen: set[str] = set()

    def check_ids(ids: list[str]) -> None:
        dup = [n for n in ids if n in seen] or [n for n, c in Counter(ids).items() if c > 1]
        if dup:
            raise ValueError(f"note id(s) embedded by more than one shard: {', '.join(dup[:5])}")
        seen.update(ids)

    with storage.local_target(storage.join(out_dir, "vectors.npy")) as npy:
        mat = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(total, dim))
        start = 0

        def add(table: pa.Table, vecs: np.ndarray) -> None:
            nonlocal start
            check_ids(table.column("note_id").to_pylist())
            mat[start:start + len(vecs)] = vecs
            start += len(vecs)

        _concat([storage.join(d, "notes.parquet") for d in order],
                storage.join(out_dir, "notes.parquet"), add)
        mat.flush()
    probes = sorted(set.intersection(*(set(m["probes"]) for m in metas)))
    for probe in probes:
        _concat([storage.join(d, f"probe_{probe}.parquet") for d in order],
                storage.join(out_dir, f"probe_{probe}.parquet"))
    seconds = sum(m["seconds"] for m in metas)
    meta = {"shards": len(metas), "notes": total, "dim": int(dim),
            "seconds_total": round(seconds, 3), "probes": probes,
            "notes_per_s_per_shard": [m["notes_per_s"] for m in sorted(
                metas, key=lambda m: m["shard_index"])],
            "shard_index": 0, "num_shards": 1, "seconds": round(seconds, 3)}
    storage.write_text(storage.join(out_dir, "embed.json"), json.dumps(meta, indent=2))
    log.info("merged %d shard(s): %d notes", len(metas), total)
    return {"embed/notes": total, "embed/shards": len(metas)}


def _concat(sources: list[str], uri: str, each=None) -> None:
    """One vectors Parquet file of ``sources`` in order, read one at a time; ``each(table,
    vectors)`` sees every source's rows before they are written."""
    import pyarrow.parquet as pq

    with storage.local_target(uri) as local:
        writer = None
        try:
            for src in sources:
                with storage.local_copy(src) as path:
                    table = pq.read_table(path)
                if each is not None:
                    each(table, _matrix(table))
                if writer is None:
                    writer = pq.ParquetWriter(local, table.schema)
                writer.write_table(table.cast(writer.schema), row_group_size=ROW_GROUP)
        finally:
            if writer is not None:
                writer.close()
