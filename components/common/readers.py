"""Readers for the two input layouts and the canonical writer.

Official NoteLLM layout (headerless CSV, what the paper's data release ships)::

    notes_train.csv        noteid,title,content,imgid,category
    notes_test.csv
    note_pairs_train.csv   noteid1,noteid2
    note_pairs_val.csv     (optional)
    note_pairs_test.csv
    note_pairs_test_<slice>.csv   (optional, one per evaluation slice)
    images/ images_test/   image files named by imgid, with or without an extension
    events.csv             (optional, ours) user_id,note_id,event,ts with a header

Canonical layout (what ``ingest`` writes and every later step reads): the same names with
``.parquet`` (or ``.jsonl``) and the columns of :mod:`components.common.schema`; ``pairs_<name>``
is accepted beside ``note_pairs_<name>``; ``image_uri`` may be relative to the folder.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from components.common import storage
from components.common.schema import (
    EVENT_COLUMNS,
    EVENT_TYPES,
    NOTE_COLUMNS,
    OFFICIAL_NOTE_FIELDS,
    OFFICIAL_PAIR_FIELDS,
    PAIR_COLUMNS,
    PROVENANCE,
    DataError,
    NoteDataset,
    split_topics,
    where,
)

log = logging.getLogger(__name__)

_NOTES = re.compile(r"^notes_(?P<split>[A-Za-z0-9]+)\.(?P<ext>csv|parquet|jsonl)$")
_PAIRS = re.compile(r"^(?:note_)?pairs_(?P<name>[A-Za-z0-9_]+)\.(?P<ext>csv|parquet|jsonl)$")
_EVENTS = re.compile(r"^events\.(?P<ext>csv|parquet|jsonl)$")
_HEADER_WORDS = {"noteid", "note_id", "noteid1", "noteid2", "query_id", "target_id", "id"}


def detect_layout(data_uri: str) -> str:
    """``official`` when the folder holds ``notes_*.csv``, ``canonical`` for Parquet/JSONL."""
    names = storage.list_files(data_uri)
    if not names and not storage.is_dir(data_uri):
        raise DataError(f"{data_uri}: no such data folder")
    exts = {m["ext"] for n in names if (m := _NOTES.match(n))}
    if "csv" in exts:
        return "official"
    if exts & {"parquet", "jsonl"}:
        return "canonical"
    raise DataError(
        f"{data_uri}: no notes file found. Expected notes_<split>.csv (official NoteLLM layout) "
        f"or notes_<split>.parquet / .jsonl (canonical layout); the folder holds: "
        f"{', '.join(names[:20]) or 'nothing'}"
    )


def read_dataset(data_uri: str) -> NoteDataset:
    """Read a data folder in either layout into canonical tables (no validation beyond parsing)."""
    layout = detect_layout(data_uri)
    names = storage.list_files(data_uri)
    ds = NoteDataset(notes={}, pairs={}, layout=layout, source=data_uri)
    image_index = _ImageIndex(data_uri) if layout == "official" else None
    for name in names:
        path = storage.join(data_uri, name)
        if m := _NOTES.match(name):
            if m["ext"] == "csv":
                ds.notes[m["split"]] = _read_official_notes(path, m["split"], image_index, ds)
            else:
                ds.notes[m["split"]] = _read_canonical_notes(path, data_uri)
        elif m := _PAIRS.match(name):
            key = m["name"]
            if key in ds.pairs:
                raise DataError(f"{name}: pairs {key!r} given twice (as pairs_ and note_pairs_)")
            if m["ext"] == "csv":
                ds.pairs[key] = _read_official_pairs(path)
            else:
                ds.pairs[key] = _read_canonical_pairs(path)
        elif m := _EVENTS.match(name):
            ds.events = _read_events(path, m["ext"])
    return ds


# -- official CSV ------------------------------------------------------------------------------


def _csv_rows(path: str):
    """Yield (row_number, line_number, fields) for the non-blank records of a headerless CSV."""
    text = storage.read_bytes(path).decode("utf-8-sig", errors="replace")
    reader = csv.reader(io.StringIO(text, newline=""))
    row = 0
    for fields in reader:
        if not fields or all(not f.strip() for f in fields):
            continue
        row += 1
        if row == 1 and fields[0].strip().lower() in _HEADER_WORDS:
            continue  # a header line some exports add; the official files have none
        yield row, reader.line_num, fields


def _read_official_notes(path: str, split: str, images: _ImageIndex, ds: NoteDataset):
    file = storage.basename(path)
    records, merged = [], 0
    for row, line, fields in _csv_rows(path):
        if len(fields) < len(OFFICIAL_NOTE_FIELDS):
            missing = OFFICIAL_NOTE_FIELDS[len(fields):]
            raise DataError(
                f"{where(file, row, missing[0])} (line {line}): expected "
                f"{len(OFFICIAL_NOTE_FIELDS)} fields ({','.join(OFFICIAL_NOTE_FIELDS)}), got "
                f"{len(fields)}; missing {', '.join(repr(m) for m in missing)}"
            )
        if len(fields) > len(OFFICIAL_NOTE_FIELDS):
            # An unquoted comma inside the text: id and title first, imgid and category last,
            # the rest is content. Counted and reported rather than refused.
            fields = [fields[0], fields[1], ",".join(fields[2:-2]), fields[-2], fields[-1]]
            merged += 1
        note_id, title, content, imgid, category = (f.strip() for f in fields)
        if not note_id:
            raise DataError(f"{where(file, row, 'noteid')} (line {line}): empty note id")
        content, topics = split_topics(content)
        records.append({
            "note_id": note_id, "title": title, "content": content, "topics": topics,
            "image_uri": images.find(imgid, split) if imgid else "",
            "imgid": imgid, "category": category, "_file": file, "_row": row,
        })
    if merged:
        ds.warnings.append(f"{file}: {merged} row(s) had more than 5 fields (unquoted commas); "
                           "the extra fields were joined into 'content'")
    return _frame(records, NOTE_COLUMNS + ["imgid"])


def _read_official_pairs(path: str) -> pd.DataFrame:
    file = storage.basename(path)
    records = []
    for row, line, fields in _csv_rows(path):
        if len(fields) < 2:
            raise DataError(f"{where(file, row, 'noteid2')} (line {line}): expected 2 fields "
                            f"({','.join(OFFICIAL_PAIR_FIELDS)}), got {len(fields)}")
        a, b = fields[0].strip(), fields[1].strip()
        for value, name in ((a, "noteid1"), (b, "noteid2")):
            if not value:
                raise DataError(f"{where(file, row, name)} (line {line}): empty note id")
        score = float("nan")
        if len(fields) > 2 and fields[2].strip():
            try:
                score = float(fields[2])
            except ValueError:
                raise DataError(f"{where(file, row, 'score')}: not a number: {fields[2]!r}") from None
        records.append({"query_id": a, "target_id": b, "score": score, "_file": file, "_row": row})
    return _frame(records, PAIR_COLUMNS)


class _ImageIndex:
    """Finds an image by ``imgid`` (with or without extension) in ``images*/`` folders."""

    def __init__(self, data_uri: str):
        self.data_uri = data_uri
        self.dirs: dict[str, dict[str, str]] = {}
        for d in ("images", "images_test", "images_train", "images_val"):
            files = storage.list_files(storage.join(data_uri, d))
            if files:
                by_name = {f: f for f in files}
                for f in files:
                    stem = f.rsplit(".", 1)[0] if "." in f else f
                    by_name.setdefault(stem, f)
                self.dirs[d] = by_name
        self._order: dict[str, list[str]] = {}

    def find(self, imgid: str, split: str) -> str:
        # the split's own folder first, then images/, then the rest (computed once per split)
        if split not in self._order:
            first = [d for d in (f"images_{split}", "images") if d in self.dirs]
            self._order[split] = first + [d for d in self.dirs if d not in first]
        for d in self._order[split]:
            files = self.dirs[d]
            hit = files.get(imgid) or files.get(imgid.rsplit(".", 1)[0])
            if hit:
                return storage.join(self.data_uri, d, hit)
        return ""


# -- canonical Parquet / JSONL -------------------------------------------------------------------


def read_table(path: str) -> pd.DataFrame:
    file = storage.basename(path)
    try:
        if path.endswith(".parquet"):
            with storage.local_copy(path) as local:
                return pq.read_table(local).to_pandas()
        return pd.read_json(io.BytesIO(storage.read_bytes(path)), lines=True, dtype=False)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise DataError(f"{file}: cannot be read as {path.rsplit('.', 1)[-1]}: {e}") from None


def _require(df: pd.DataFrame, file: str, columns: list[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{file}: missing column(s) {', '.join(repr(c) for c in missing)} "
                        f"(every row); the file has {', '.join(map(str, df.columns)) or 'none'}")


def _read_canonical_notes(path: str, data_uri: str) -> pd.DataFrame:
    file = storage.basename(path)
    df = read_table(path)
    _require(df, file, ["note_id", "title", "content", "image_uri"])
    df = df.copy()
    for col in ("title", "content", "category", "image_uri"):
        if col not in df.columns:
            df[col] = ""
        df[col] = df[col].fillna("").astype(str)
    bad = df["note_id"].isna() | (df["note_id"].astype(str).str.strip() == "")
    if bad.any():
        row = int(bad.to_numpy().argmax()) + 1
        raise DataError(f"{where(file, row, 'note_id')}: empty note id")
    df["note_id"] = df["note_id"].astype(str).str.strip()
    topics, contents = [], []
    for content, given in zip(df["content"], df.get("topics", [None] * len(df)), strict=True):
        stripped, inline = split_topics(content)
        listed = _as_list(given)
        contents.append(stripped)
        topics.append(listed + [t for t in inline if t not in listed])
    df["content"], df["topics"] = contents, topics
    df["image_uri"] = [_resolve(u, data_uri) for u in df["image_uri"]]
    if "_file" not in df.columns:
        df["_file"], df["_row"] = file, range(1, len(df) + 1)
    return df[NOTE_COLUMNS + PROVENANCE].reset_index(drop=True)


def _as_list(value) -> list[str]:
    if value is None or (isinstance(value, float) and value != value):
        return []
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    return [str(t) for t in value]


def _resolve(uri: str, data_uri: str) -> str:
    uri = uri.strip()
    if not uri or storage.is_gcs(uri) or uri.startswith("/"):
        return uri
    return storage.join(data_uri, uri)


def _read_canonical_pairs(path: str) -> pd.DataFrame:
    file = storage.basename(path)
    df = read_table(path)
    _require(df, file, ["query_id", "target_id"])
    df = df.copy()
    for col in ("query_id", "target_id"):
        bad = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if bad.any():
            raise DataError(f"{where(file, int(bad.to_numpy().argmax()) + 1, col)}: empty note id")
        df[col] = df[col].astype(str).str.strip()
    df["score"] = pd.to_numeric(df["score"], errors="coerce") if "score" in df else float("nan")
    if "_file" not in df.columns:
        df["_file"], df["_row"] = file, range(1, len(df) + 1)
    return df[PAIR_COLUMNS + PROVENANCE].reset_index(drop=True)


def _read_events(path: str, ext: str) -> pd.DataFrame:
    file = storage.basename(path)
    if ext == "csv":
        df = pd.read_csv(io.BytesIO(storage.read_bytes(path)), dtype=str, keep_default_na=False)
    else:
        df = read_table(path)
    _require(df, file, EVENT_COLUMNS)
    df = df[EVENT_COLUMNS].copy()
    for col in ("user_id", "note_id", "event"):
        df[col] = df[col].astype(str).str.strip()
    unknown = ~df["event"].isin(EVENT_TYPES)
    if unknown.any():
        row = int(unknown.to_numpy().argmax()) + 1
        raise DataError(f"{where(file, row, 'event')}: unknown event {df['event'].iloc[row - 1]!r}"
                        f" (expected one of {', '.join(EVENT_TYPES)})")
    ts = pd.to_datetime(df["ts"], errors="coerce", utc=True, format="ISO8601")
    if ts.isna().any():
        row = int(ts.isna().to_numpy().argmax()) + 1
        raise DataError(f"{where(file, row, 'ts')}: unparseable timestamp {df['ts'].iloc[row - 1]!r}")
    df["ts"] = ts
    df["_file"], df["_row"] = file, range(1, len(df) + 1)
    return df.reset_index(drop=True)


def _frame(records: list[dict], columns: list[str]) -> pd.DataFrame:
    cols = columns + PROVENANCE
    if not records:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    return pd.DataFrame.from_records(records, columns=cols)


# -- canonical writer ----------------------------------------------------------------------------


def write_table(df: pd.DataFrame, uri: str) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
    storage.write_bytes(uri, buf.getvalue())


def write_canonical(ds: NoteDataset, out_uri: str) -> dict:
    """Write canonical Parquet tables plus ``manifest.json``; returns the manifest."""
    manifest = {"source": ds.source, "layout": ds.layout, "notes": {}, "pairs": {},
                "slices": ds.slices, "warnings": ds.warnings}
    for split, df in ds.notes.items():
        cols = NOTE_COLUMNS + (["imgid"] if "imgid" in df.columns else []) + PROVENANCE
        write_table(df[cols], storage.join(out_uri, f"notes_{split}.parquet"))
        manifest["notes"][split] = len(df)
    for name, df in ds.pairs.items():
        write_table(df[PAIR_COLUMNS + PROVENANCE], storage.join(out_uri, f"pairs_{name}.parquet"))
        manifest["pairs"][name] = len(df)
    if ds.events is not None:
        write_table(ds.events, storage.join(out_uri, "events.parquet"))
        manifest["events"] = len(ds.events)
    storage.write_text(storage.join(out_uri, "manifest.json"), json.dumps(manifest, indent=2))
    return manifest
