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

Refused with a :class:`DataError` naming file, row, field and line (nothing is replaced, guessed
or picked silently): bytes that are not ``data.encoding`` (default UTF-8; e.g. ``gb18030`` reads
GBK exports, with a warning); a stray opening quote that swallows later records
(:func:`_csv_rows`); a field over the CSV reader's limit (131,072 characters, or
``data.max_content_chars`` when larger); a table given twice (``notes_train.csv`` beside
``notes_train.parquet``); an empty notes file; a non-finite pair score; and, in the canonical
layout, an ``image_uri`` with a ``..`` segment, of another scheme, or outside the folder
(:func:`_resolve`).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from components.common import storage
from components.common.config import DataConfig
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


def read_dataset(data_uri: str, cfg: DataConfig | None = None) -> NoteDataset:
    """Read a data folder in either layout into canonical tables (no validation beyond parsing).
    ``cfg``: ``data.encoding`` of the CSV files and the CSV field limit
    (``data.max_content_chars``); the defaults when not given."""
    cfg = cfg or DataConfig()
    layout = detect_layout(data_uri)
    names = storage.list_files(data_uri)
    _refuse_given_twice(data_uri, names)
    ds = NoteDataset(notes={}, pairs={}, layout=layout, source=data_uri)
    image_index = _ImageIndex(data_uri) if layout == "official" else None
    opts = _CsvOptions(cfg)
    roots = _image_roots(data_uri, names) if layout == "canonical" else []
    for name in names:
        path = storage.join(data_uri, name)
        if m := _NOTES.match(name):
            if m["ext"] == "csv":
                ds.notes[m["split"]] = _read_official_notes(path, m["split"], image_index, ds,
                                                            opts)
            else:
                ds.notes[m["split"]] = _read_canonical_notes(path, data_uri, roots)
        elif m := _PAIRS.match(name):
            key = m["name"]
            if m["ext"] == "csv":
                ds.pairs[key] = _read_official_pairs(path, opts)
            else:
                ds.pairs[key] = _read_canonical_pairs(path)
        elif m := _EVENTS.match(name):
            ds.events = _read_events(path, m["ext"], opts)
    if opts.used:
        ds.warnings.append(f"{', '.join(opts.used)}: read as {opts.encoding} (data.encoding="
                           f"{cfg.encoding}), not UTF-8")
    return ds


def _refuse_given_twice(data_uri: str, names: list[str]) -> None:
    """One table, one file: notes_train.csv beside notes_train.parquet (or pairs_x beside
    note_pairs_x, events.csv beside events.parquet) would leave the choice to the listing order."""
    tables: dict[tuple[str, str], list[str]] = {}
    for name in names:
        if m := _NOTES.match(name):
            tables.setdefault(("notes", m["split"]), []).append(name)
        elif m := _PAIRS.match(name):
            tables.setdefault(("pairs", m["name"]), []).append(name)
        elif _EVENTS.match(name):
            tables.setdefault(("events", ""), []).append(name)
    for (kind, key), files in tables.items():
        if len(files) > 1:
            what = f"{kind} {key!r}" if key else kind
            raise DataError(f"{data_uri}: {what} given twice, as {' and '.join(files)}: keep "
                            "one of them (the reader would otherwise pick one silently)")


# -- official CSV ------------------------------------------------------------------------------


# csv's own default; raised to data.max_content_chars when that is larger
_CSV_FIELD_LIMIT = 131_072
_ID = re.compile(r"^[0-9A-Za-z_\-.:]{1,128}$")
_CATEGORY = re.compile(r"^(?:[^@\n]+@)*$")
_NEWLINE = re.compile(r"\r\n|\r|\n")


class _CsvOptions:
    """How the CSV files of one folder are decoded and parsed."""

    def __init__(self, cfg: DataConfig):
        self.encoding = cfg.encoding
        codec = codecs.lookup(cfg.encoding).name
        self.utf8 = codec == "utf-8"
        self.field_limit = max(_CSV_FIELD_LIMIT, cfg.max_title_chars, cfg.max_content_chars)
        self.used: list[str] = []  # files read with a non-UTF-8 encoding


def _decode(data: bytes, file: str, names: list[str], opts: _CsvOptions, header: bool) -> str:
    """The text of a CSV file. Undecodable bytes are an error naming the row (as the reader
    counts rows; ``header``: the first line is a header, not a row), line, field and byte
    offset: nothing is replaced."""
    skip = 3 if opts.utf8 and data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[skip:].decode("utf-8" if opts.utf8 else opts.encoding)
    except UnicodeDecodeError as e:
        start = e.start + skip
        row, fld = _locate(data[skip:e.start + skip], opts, names, header)
        line = data.count(b"\n", 0, start) + 1
        bad = data[start:max(e.end + skip, start + 1)][:8]
        hint = ("convert the file to UTF-8, or set data.encoding to its encoding (e.g. "
                "data.encoding=gb18030 for GBK/GB2312 exports, data.encoding=latin-1)"
                if opts.utf8 else "check data.encoding")
        raise DataError(f"{where(file, row, fld)} (line {line}, byte {start}): bytes {bad!r} "
                        f"are not valid {opts.encoding} ({e.reason}); {hint}") from None
    if not opts.utf8:
        opts.used.append(file)
    return text


@contextmanager
def _text_stream(path: str, names: list[str], opts: _CsvOptions, header: bool
                 ) -> Iterator[io.TextIOWrapper]:
    """The CSV file as text decoded incrementally (block by block, lines not translated), so
    that neither its bytes nor its whole text are ever held. Undecodable bytes are refused with
    :func:`_decode`'s message: only then is the file read whole, to name row, field and byte."""
    file = storage.basename(path)
    with storage.local_copy(path) as local, open(local, "rb") as raw:
        # utf-8-sig drops a leading BOM as _decode does
        text = io.TextIOWrapper(raw, encoding="utf-8-sig" if opts.utf8 else opts.encoding,
                                errors="strict", newline="")
        try:
            yield text
        except UnicodeDecodeError:
            _decode(storage.read_bytes(local), file, names, opts, header)  # raises DataError
            raise
        finally:
            text.detach()
    if not opts.utf8:
        opts.used.append(file)


def _lines(stream: io.TextIOWrapper, seen: list[str], last: list[bool]) -> Iterator[str]:
    """The lines of ``stream``, each also appended to ``seen`` (the caller empties it per record:
    the raw text of the record :func:`_check_quotes` needs); ``last[0]`` turns True as the final
    line is handed out."""
    prev = None
    for line in stream:
        if prev is not None:
            seen.append(prev)
            yield prev
        prev = line
    if prev is not None:
        last[0] = True
        seen.append(prev)
        yield prev


def _locate(prefix: bytes, opts: _CsvOptions, names: list[str], header: bool
            ) -> tuple[int | None, str | None]:
    """(row, field name) of the first byte after ``prefix`` (the valid part of a file)."""
    mark = "\uffff"
    text = prefix.decode("utf-8" if opts.utf8 else opts.encoding, errors="replace") + mark
    try:
        with _field_limit(max(opts.field_limit, len(text) + 1)):
            row = 0
            for fields in csv.reader(io.StringIO(text, newline="")):
                if fields and any(f.strip() for f in fields):
                    row += 1
                for i, f in enumerate(fields):
                    if mark in f:
                        name = names[i] if i < len(names) else names[-1]
                        return (row - 1 if header else row) or None, name
    except csv.Error:
        pass
    return None, None


@contextmanager
def _field_limit(limit: int) -> Iterator[None]:
    old = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _nl(text: str) -> int:
    return len(_NEWLINE.findall(text))


def _csv_rows(path: str, names: list[str], opts: _CsvOptions,
              swallowed: Callable[[list[str]], bool], min_commas: int):
    """Yield (row_number, line_number, fields) for the non-blank records of a headerless CSV;
    ``line_number`` is the line the record starts on.

    A stray opening quote makes the csv module read on, across line ends, to the next quote
    anywhere in the file, so later records vanish into one field (and the fields after it shift:
    a note may take another's image). Multi-line quoted text is legitimate in the official data,
    so a line break alone is no evidence; a quoted field is refused when

    * it is still open at the end of the file (no closing quote at all), or
    * one of its lines after the first is, on its own, a whole record of this file
      (``swallowed``, tried on lines of at least ``min_commas`` commas: for notes five or more
      fields, an id-like first field and a category or a known image last, see
      :func:`_note_record`; for pairs any line, ids never span lines), or
    * the quote closes on a later line with more text after it (``"...x``: no CSV writer
      writes that; it is the opening quote of a later field that closed the stray one).

    The error names the row, the field and the line where the quote opened.

    The file is read as a stream (:func:`_text_stream`); only the current record's lines are
    kept."""
    file = storage.basename(path)
    seen: list[str] = []
    last = [False]
    with _text_stream(path, names, opts, header=False) as stream, \
            _field_limit(opts.field_limit):
        reader = csv.reader(_lines(stream, seen, last))
        row, end = 0, 0
        while True:
            start = end + 1
            seen.clear()
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise DataError(_csv_error(file, row + 1, start, e, opts)) from None
            end = reader.line_num
            if not fields or all(not f.strip() for f in fields):
                continue
            row += 1
            if row == 1 and fields[0].strip().lower() in _HEADER_WORDS:
                continue  # a header line some exports add; the official files have none
            if end > start or last[0]:
                _check_quotes(file, row, start, fields, names, swallowed, min_commas,
                              "".join(seen))
            yield row, start, fields


def _csv_error(file: str, row: int, start: int, e: csv.Error, opts: _CsvOptions) -> str:
    text = f"{where(file, row)} (record from line {start}): cannot be parsed as CSV: {e}"
    if "field larger than field limit" in str(e):
        text = (f"{where(file, row)} (record from line {start}): a field longer than "
                f"{opts.field_limit} characters, the CSV reader's limit (the larger of "
                f"{_CSV_FIELD_LIMIT} and data.max_content_chars); a note text that long is "
                "refused anyway. A quote opened in this record and never closed reads the rest "
                "of the file into one field the same way")
    return text


def _check_quotes(file: str, row: int, start: int, fields: list[str], names: list[str],
                  swallowed: Callable[[list[str]], bool], min_commas: int, raw: str) -> None:
    problem, fail_line = _strict_problem(raw, start)
    last_field = len(fields) - 1
    first = start
    for i, value in enumerate(fields):
        multi = "\n" in value or "\r" in value
        if not multi and not (problem == "end" and i == last_field):
            continue
        parts = _NEWLINE.split(value) if multi else [value]
        last = first + len(parts) - 1
        name = names[i] if i < len(names) else names[-1]
        here = f"{where(file, row, name)} (line {first}): a quote opened in this field"
        fix = "Remove the stray '\"' (a quote inside a field is written \"\")"
        for k, part in enumerate(parts[1:], start=1):
            if (part.count(",") >= min_commas and part.strip()
                    and swallowed(next(csv.reader([part]), []))):
                raise DataError(
                    f"{here} is not closed on its line: line {first + k} ({part[:80]!r}), a "
                    "whole record of its own, and everything up to the next quote in the file "
                    f"were read into this field. {fix}")
        if problem == "end" and i == last_field:
            raise DataError(f"{here} is never closed: the rest of the file was read into it. "
                            f"{fix}")
        if problem == "text" and first < fail_line <= last:
            raise DataError(
                f"{here} is not closed on its line: it runs to the next quote in the file, on "
                f"line {fail_line} ({parts[fail_line - first][:80]!r}), where more text follows "
                f"it; the records in between were read into this field. {fix}")
        first = last


def _strict_problem(raw: str, start: int) -> tuple[str, int]:
    """How the record's text breaks the strict CSV rules: ``("end", line)`` when it ends inside
    a quoted field, ``("text", line)`` when text follows a closing quote, ``("", 0)`` else.
    (Run inside :func:`_csv_rows`'s field limit, which the record already met.)"""
    reader = csv.reader(io.StringIO(raw, newline=""), strict=True)
    try:
        for _ in reader:
            pass
    except csv.Error as e:
        line = start + reader.line_num - 1
        if "unexpected end of data" in str(e):
            return "end", line
        if "expected after" in str(e):
            return "text", line
    return "", 0


def _note_record(images: _ImageIndex, split: str) -> Callable[[list[str]], bool]:
    """Whether a line of a notes field is a whole notes record: five or more fields, an id-like
    first one, a category (``L1@L2@``) last or, where that is empty, an image the folder has."""

    def test(fields: list[str]) -> bool:
        if len(fields) < len(OFFICIAL_NOTE_FIELDS) or not _ID.match(fields[0].strip()):
            return False
        category, imgid = fields[-1].strip(), fields[-2].strip()
        if not _CATEGORY.match(category):
            return False
        return bool(category) or bool(imgid and images.find(imgid, split))

    return test


def _pair_record(fields: list[str]) -> bool:
    return True  # an id never spans lines: any line break in a pairs field is a stray quote


def _read_official_notes(path: str, split: str, images: _ImageIndex, ds: NoteDataset,
                         opts: _CsvOptions | None = None):
    file = storage.basename(path)
    opts = opts or _CsvOptions(DataConfig())
    cols = _Columns(NOTE_COLUMNS + ["imgid"], objects=["topics"])
    add = cols.add
    merged = 0
    for row, line, fields in _csv_rows(path, OFFICIAL_NOTE_FIELDS, opts,
                                       _note_record(images, split),
                                       len(OFFICIAL_NOTE_FIELDS) - 1):
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
        add(row, (note_id, title, content, topics, images.find(imgid, split) if imgid else "",
                  category, imgid))
    notes = cols.frame(file)
    if not len(notes):
        raise DataError(f"{file}: no notes (the file is empty or holds only a header); remove "
                        "it or fill it")
    if merged:
        ds.warnings.append(f"{file}: {merged} row(s) had more than 5 fields (unquoted commas); "
                           "the extra fields were joined into 'content'")
    return notes


def _read_official_pairs(path: str, opts: _CsvOptions) -> pd.DataFrame:
    file = storage.basename(path)
    cols = _Columns(PAIR_COLUMNS)
    for row, line, fields in _csv_rows(path, OFFICIAL_PAIR_FIELDS + ["score"], opts,
                                       _pair_record, 0):
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
            if not math.isfinite(score):
                raise DataError(f"{where(file, row, 'score')} (line {line}): not a finite number:"
                                f" {fields[2]!r}")
        cols.add(row, (a, b, score))
    return cols.frame(file)


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


_JSONL_CHUNK = 65_536
_CSV_CHUNK = 262_144  # events parsed at a time  # lines parsed at a time: the file's text is never held whole


def read_table(path: str, columns: list[str] | None = None) -> pd.DataFrame:
    """A Parquet or JSONL table. ``columns``: read only those of them the file has (Parquet
    reads no other column from disk; JSONL drops the others chunk by chunk)."""
    file = storage.basename(path)
    try:
        with storage.local_copy(path) as local:
            if path.endswith(".parquet"):
                pf = pq.ParquetFile(local)
                keep = (None if columns is None else
                        [c for c in pf.schema_arrow.names if c in columns])
                return pf.read(columns=keep).to_pandas()
            with open(local, "rb") as f:
                chunks = [chunk if columns is None else
                          chunk[[c for c in chunk.columns if c in columns]]
                          for chunk in pd.read_json(f, lines=True, dtype=False,
                                                    chunksize=_JSONL_CHUNK)]
            if not chunks:
                return pd.DataFrame()
            return chunks[0] if len(chunks) == 1 else pd.concat(chunks, ignore_index=True)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise DataError(f"{file}: cannot be read as {path.rsplit('.', 1)[-1]}: {e}") from None


def _require(df: pd.DataFrame, file: str, columns: list[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{file}: missing column(s) {', '.join(repr(c) for c in missing)} "
                        f"(every row); the file has {', '.join(map(str, df.columns)) or 'none'}")


def _read_canonical_notes(path: str, data_uri: str, roots: list[str]) -> pd.DataFrame:
    file = storage.basename(path)
    df = read_table(path, NOTE_COLUMNS + PROVENANCE)
    _require(df, file, ["note_id", "title", "content", "image_uri"])
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
    if "_file" not in df.columns:
        df["_file"], df["_row"] = file, range(1, len(df) + 1)
    df["image_uri"] = [_resolve(u, data_uri, roots, f, int(r))
                       for u, f, r in zip(df["image_uri"], df["_file"], df["_row"], strict=True)]
    return df[NOTE_COLUMNS + PROVENANCE].reset_index(drop=True)


def _as_list(value) -> list[str]:
    if value is None or (isinstance(value, float) and value != value):
        return []
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    return [str(t) for t in value]


# a URI of some scheme ("http://", "s3://", "file:/", "data:"), not a relative path
_SCHEME = re.compile(r"^(?:[a-z][a-z0-9+.\-]*://|(?:file|data|https?|ftp|s3|gs):)", re.I)


def _image_roots(data_uri: str, names: list[str]) -> list[str]:
    """Where a canonical folder's images may live: the folder itself and, for a folder that
    ``ingest`` wrote (its ``manifest.json`` names the ``source`` folder it was read from, whose
    images its absolute ``image_uri`` point into), that source folder. A source that is a
    filesystem or bucket root is not a folder of images and is ignored."""
    roots = [data_uri]
    if "manifest.json" in names:
        try:
            source = json.loads(storage.read_text(storage.join(data_uri, "manifest.json"))
                                ).get("source")
        except (OSError, ValueError, AttributeError):
            source = None
        if isinstance(source, str) and source.strip() and ".." not in re.split(r"[/\\]", source):
            source = source.strip()
            deep = (storage.is_gcs(source) and "/" in source[len("gs://"):].strip("/")) or (
                not storage.is_gcs(source) and os.path.dirname(_local(source)) != _local(source))
            if deep:
                roots.append(source)
    return roots


def _local(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def _under(uri: str, root: str) -> bool:
    if storage.is_gcs(root):
        return storage.is_gcs(uri) and uri.startswith(root.rstrip("/") + "/")
    if storage.is_gcs(uri):
        return False
    return _local(uri).startswith(_local(root).rstrip(os.sep) + os.sep)


def _resolve(uri: str, data_uri: str, roots: list[str], file: str, row: int) -> str:
    """The image path of a canonical row: relative to the folder, or absolute / ``gs://`` under
    one of ``roots`` (:func:`_image_roots`). A ``..`` segment, another scheme (``http:``,
    ``file:``, ``s3:``) or a path elsewhere is refused: a data folder names its own images, not
    files of the machine or the network the pipeline runs on."""
    uri = uri.strip()
    if not uri:
        return uri
    here = where(file, row, "image_uri")
    if ".." in re.split(r"[/\\]", uri):
        raise DataError(f"{here}: {uri!r} has a '..' segment; an image path must stay inside "
                        "the data folder")
    absolute = storage.is_gcs(uri) or uri.startswith("/") or bool(_SCHEME.match(uri))
    if not absolute:
        return storage.join(data_uri, uri)
    if (storage.is_gcs(uri) or uri.startswith("/")) and any(_under(uri, r) for r in roots):
        return uri
    raise DataError(f"{here}: {uri!r} is outside the data folder {data_uri}; an image_uri is "
                    "relative to the folder, or an absolute path or gs:// URI under it")


def _read_canonical_pairs(path: str) -> pd.DataFrame:
    file = storage.basename(path)
    df = read_table(path, PAIR_COLUMNS + PROVENANCE)
    _require(df, file, ["query_id", "target_id"])
    for col in ("query_id", "target_id"):
        bad = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if bad.any():
            raise DataError(f"{where(file, int(bad.to_numpy().argmax()) + 1, col)}: empty note id")
        df[col] = df[col].astype(str).str.strip()
    df["score"] = pd.to_numeric(df["score"], errors="coerce") if "score" in df else float("nan")
    if "_file" not in df.columns:
        df["_file"], df["_row"] = file, range(1, len(df) + 1)
    return df[PAIR_COLUMNS + PROVENANCE].reset_index(drop=True)


def _read_events(path: str, ext: str, opts: _CsvOptions | None = None) -> pd.DataFrame:
    file = storage.basename(path)
    opts = opts or _CsvOptions(DataConfig())
    if ext == "csv":
        with _text_stream(path, EVENT_COLUMNS, opts, header=True) as text:
            try:
                # in chunks: the parser's Python strings of one chunk at a time, not the file's
                chunks = list(pd.read_csv(text, dtype=str, keep_default_na=False,
                                          chunksize=_CSV_CHUNK))
                df = chunks[0] if len(chunks) == 1 else pd.concat(chunks, ignore_index=True)
                del chunks
            except UnicodeDecodeError:
                raise  # _text_stream names row, field and byte
            except ValueError as e:
                raise DataError(f"{file}: cannot be parsed as CSV: {e}") from None
    else:
        df = read_table(path, EVENT_COLUMNS)
    _require(df, file, EVENT_COLUMNS)
    if list(df.columns) != EVENT_COLUMNS:
        df = df[EVENT_COLUMNS]
    for col in ("user_id", "note_id", "event"):
        # astype(str) and strip keep a value's string object when there is nothing to change
        df[col] = df[col].astype(str).str.strip()
    unknown = ~df["event"].isin(EVENT_TYPES)
    if unknown.any():
        row = int(unknown.to_numpy().argmax()) + 1
        raise DataError(f"{where(file, row, 'event')}: unknown event {df['event'].iloc[row - 1]!r}"
                        f" (expected one of {', '.join(EVENT_TYPES)})")
    ts = _timestamps(df["ts"])
    if ts.isna().any():
        row = int(ts.isna().to_numpy().argmax()) + 1
        raise DataError(f"{where(file, row, 'ts')}: unparseable timestamp {df['ts'].iloc[row - 1]!r}")
    df["ts"] = ts
    df["_file"], df["_row"] = file, range(1, len(df) + 1)
    return df.reset_index(drop=True)


def _timestamps(values: pd.Series) -> pd.Series:
    """ISO 8601 text to UTC timestamps (NaT where unparseable), a chunk at a time: the parser
    makes a Python string of every value it is given."""
    def parse(part: pd.Series) -> pd.Series:
        return pd.to_datetime(part, errors="coerce", utc=True, format="ISO8601")

    if len(values) <= _CSV_CHUNK:
        return parse(values)
    return pd.concat([parse(values.iloc[i:i + _CSV_CHUNK])
                      for i in range(0, len(values), _CSV_CHUNK)])


_CHUNK_ROWS = 65_536  # rows of a CSV held as Python strings before they move into Arrow


class _Columns:
    """A table built row by row in compact form: a chunk of rows (tuples, no dict per row) is
    moved into one Arrow array per column every ``chunk`` rows, so at most one chunk of rows is
    held as Python objects. ``objects``: columns kept as Python objects (``topics``, a list per
    note)."""

    def __init__(self, names: list[str], objects: tuple[str, ...] | list[str] = (),
                 chunk: int | None = None):
        self.names, self.objects, self.chunk = names, set(objects), chunk or _CHUNK_ROWS
        self._chunk: list[tuple] = []  # (row, *values)
        self._arrow: dict[str, list[pa.Array]] = {c: [] for c in ["_row", *names]}
        self._kept: dict[str, list] = {c: [] for c in self.objects}
        self.rows = 0

    def add(self, row: int, values: tuple) -> None:
        self._chunk.append((row, *values))
        if len(self._chunk) >= self.chunk:
            self._flush()

    def _flush(self) -> None:
        if not self._chunk:
            return
        self.rows += len(self._chunk)
        for name, values in zip(["_row", *self.names], zip(*self._chunk, strict=True),
                                strict=True):
            if name in self.objects:
                self._kept[name] += values
            else:
                self._arrow[name].append(pa.array(values, pa.int64() if name == "_row" else None))
        self._chunk.clear()

    def frame(self, file: str) -> pd.DataFrame:
        """The columns plus provenance (``_file``, ``_row``)."""
        self._flush()
        if not self.rows:
            return _empty_frame(self.names)
        arrow, self._arrow = self._arrow, {}
        df = pa.table({name: pa.chunked_array(arrow.pop(name)) for name in ["_row", *self.names]
                       if name not in self.objects}).to_pandas()
        for name in self.objects:
            values = np.empty(self.rows, dtype=object)
            values[:] = self._kept.pop(name)  # element by element: each value stays a list
            df[name] = values
        df["_file"] = file
        return df[self.names + PROVENANCE]


def _empty_frame(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in columns + PROVENANCE})


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
