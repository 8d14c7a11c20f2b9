"""A corpus of bad inputs: each case corrupts, in place, a copy of a valid official-layout data
folder (as written by ``tests.conftest.write_official`` or ``pipelines.demo_data.make_demo_data``)
so that the pipeline must refuse it with a clear error.

``CASES[name](root)`` corrupts the folder at ``root``; ``EXPECT[name]`` is a regular expression
(``re.search``) the error message must match; ``LAYER[name]`` is where the refusal happens:
``reader`` (``components.common.readers.read_dataset``, the ``ingest`` step) or ``validate``
(``components.validate.run.run``, the Great Expectations suites and the image check).

Only refusals are here: inputs that must still be accepted (a BOM, a header line, unquoted
commas, multi-line quoted content) are tested in ``tests/components/test_readers.py``.
"""

from __future__ import annotations

import csv
import io
import os
import struct
import zlib
from collections.abc import Callable

# -- helpers -----------------------------------------------------------------------------------


def bomb_png(width: int, height: int) -> bytes:
    """A valid greyscale PNG of ``width`` x ``height`` black pixels: a few hundred KB that decode
    to width x height bytes (a decompression bomb). Compressed row by row, so making it costs
    little memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + one byte per pixel
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))


def read_rows(path: str, encoding: str = "utf-8") -> list[list[str]]:
    with open(path, encoding=encoding, newline="") as f:
        return [r for r in csv.reader(f) if r]


def write_rows(path: str, rows: list[list[str]], encoding: str = "utf-8") -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    with open(path, "wb") as f:
        f.write(buf.getvalue().encode(encoding))


def _append(path: str, text: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    sep = b"" if not data or data.endswith(b"\n") else b"\n"
    with open(path, "ab") as f:
        f.write(sep + text.encode("utf-8"))


def _edit_row(path: str, row: int, field: int, change: Callable[[str], str],
              encoding: str = "utf-8") -> None:
    rows = read_rows(path)
    rows[row - 1][field] = change(rows[row - 1][field])
    write_rows(path, rows, encoding)


def image_of(root: str, split: str = "train", row: int = 1) -> str:
    """The image file of the note in ``notes_<split>.csv`` row ``row`` (imgid with or without
    extension, in ``images_<split>/`` or ``images/``)."""
    imgid = read_rows(os.path.join(root, f"notes_{split}.csv"))[row - 1][3]
    for d in (f"images_{split}", "images"):
        folder = os.path.join(root, d)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name == imgid or name.rsplit(".", 1)[0] == imgid.rsplit(".", 1)[0]:
                return os.path.join(folder, name)
    raise FileNotFoundError(f"no image for {imgid!r} in {root}")


def to_canonical(root: str) -> None:
    """Rewrite the folder in the canonical layout (``notes_<split>.parquet`` with a relative
    ``image_uri``, ``pairs_<name>.parquet``), keeping the images where they are."""
    from components.common.readers import read_dataset
    from components.common.schema import NOTE_COLUMNS

    ds = read_dataset(root)
    for split, df in ds.notes.items():
        df = df[NOTE_COLUMNS].copy()
        df["image_uri"] = [os.path.relpath(u, root) if u else "" for u in df["image_uri"]]
        df.to_parquet(os.path.join(root, f"notes_{split}.parquet"), index=False)
    for name, df in ds.pairs.items():
        df[["query_id", "target_id"]].to_parquet(os.path.join(root, f"pairs_{name}.parquet"),
                                                 index=False)
    for f in os.listdir(root):
        if f.endswith(".csv") and (f.startswith("notes_") or f.startswith("note_pairs_")):
            os.remove(os.path.join(root, f))


def _set_image_uri(root: str, value: str) -> None:
    import pandas as pd

    to_canonical(root)
    path = os.path.join(root, "notes_train.parquet")
    df = pd.read_parquet(path)
    df.loc[0, "image_uri"] = value
    df.to_parquet(path, index=False)


def _first_id(root: str, split: str = "train") -> str:
    return read_rows(os.path.join(root, f"notes_{split}.csv"))[0][0]


def _events(root: str, bad_row: str) -> None:
    path = os.path.join(root, "events.csv")
    if not os.path.exists(path):
        nid = _first_id(root)
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"user_id,note_id,event,ts\nu1,{nid},view,2024-01-01T00:00:00Z\n")
    _append(path, bad_row + "\n")


# -- the cases ---------------------------------------------------------------------------------


def gbk_notes(root: str) -> None:
    """notes_train.csv exported as GBK (gb18030), the usual encoding of Chinese Excel exports."""
    path = os.path.join(root, "notes_train.csv")
    rows = read_rows(path)
    rows[0][1] = "南瓜娃娃 " + rows[0][1]
    write_rows(path, rows, "gb18030")


def latin1_notes(root: str) -> None:
    """notes_test.csv row 1 pasted from a Latin-1 (Windows-1252) export: its title starts with
    "Café crème" in Latin-1 bytes, the rest of the file stays UTF-8."""
    path = os.path.join(root, "notes_test.csv")
    with open(path, "rb") as f:
        data = f.read()
    comma = data.index(b",")
    with open(path, "wb") as f:
        f.write(data[:comma + 1] + "Café crème ".encode("latin-1") + data[comma + 1:])


def binary_garbage_csv(root: str) -> None:
    """note_pairs_train.csv overwritten by binary bytes (a mis-copied file)."""
    import random

    with open(os.path.join(root, "note_pairs_train.csv"), "wb") as f:
        f.write(b"\xff\xfe\x00\x01" + random.Random(0).randbytes(4096))


def stray_quote(root: str) -> None:
    """Row 2's title begins with a quote that is never closed: the csv module reads the
    following lines into that title (a note vanishes, another may take its image)."""
    path = os.path.join(root, "notes_train.csv")
    rows = read_rows(path)
    out = []
    for i, r in enumerate(rows):
        line = io.StringIO()
        csv.writer(line, lineterminator="\n").writerow(r if i != 1 else r[2:])
        text = line.getvalue()[:-1]
        out.append(text if i != 1 else f'{r[0]},"Stray title,{text}')
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\n".join(out) + "\n")


def huge_field(root: str) -> None:
    """A content of 200,000 characters: over the CSV reader's field limit (131,072)."""
    _edit_row(os.path.join(root, "notes_train.csv"), 2, 2, lambda c: "x" * 200_000)


def long_content(root: str) -> None:
    """A content of 30,000 characters: over data.max_content_chars (20,000)."""
    _edit_row(os.path.join(root, "notes_train.csv"), 2, 2, lambda c: "y" * 30_000)


def csv_and_parquet(root: str) -> None:
    """notes_train given twice: as CSV and as Parquet."""
    import pandas as pd

    rows = read_rows(os.path.join(root, "notes_train.csv"))
    pd.DataFrame({"note_id": [r[0] for r in rows], "title": [r[1] for r in rows],
                  "content": [r[2] for r in rows], "image_uri": ["" for _ in rows]}
                 ).to_parquet(os.path.join(root, "notes_train.parquet"), index=False)


def empty_notes(root: str) -> None:
    """notes_test.csv empty (an export that wrote nothing)."""
    open(os.path.join(root, "notes_test.csv"), "w").close()


def unknown_pair_note(root: str) -> None:
    """A test pair naming a note no notes file has (a test pair: with events, the training pairs
    are mined and the given ones not used, the test pairs stay)."""
    _append(os.path.join(root, "note_pairs_test.csv"), f"{_first_id(root, 'test')},nosuchnote\n")


def duplicate_note_id(root: str) -> None:
    """The first training note appears again in notes_test.csv."""
    first = read_rows(os.path.join(root, "notes_train.csv"))[0]
    line = io.StringIO()
    csv.writer(line, lineterminator="\n").writerow(first)
    _append(os.path.join(root, "notes_test.csv"), line.getvalue())


def pair_score_inf(root: str) -> None:
    """A pair score that is not finite."""
    ids = [r[0] for r in read_rows(os.path.join(root, "notes_train.csv"))[:2]]
    _append(os.path.join(root, "note_pairs_train.csv"), f"{ids[0]},{ids[1]},inf\n")


def events_nan_ts(root: str) -> None:
    """An event whose timestamp is NaN."""
    _events(root, f"u9,{_first_id(root)},click,nan")


def events_inf_ts(root: str) -> None:
    """An event whose timestamp is inf."""
    _events(root, f"u9,{_first_id(root)},view,inf")


def bomb_image(root: str, row: int = 1) -> None:
    """A first training image replaced by a 10000 x 8000 PNG (80 M pixels, ~100 KB on disk):
    under Pillow's default limit (89 M), over data.max_image_pixels (64 M)."""
    with open(image_of(root, row=row), "wb") as f:
        f.write(bomb_png(10_000, 8_000))


def oversize_image(root: str, row: int = 1) -> None:
    """A first training image padded to 33 MiB (a sparse file): over data.max_image_bytes."""
    with open(image_of(root, row=row), "r+b") as f:
        f.truncate(33 * 1024 * 1024)


def truncated_image(root: str, row: int = 1) -> None:
    """The first training image cut to half its bytes."""
    path = image_of(root, row=row)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def no_test_notes(root: str) -> None:
    """No notes_test.csv (nor its images): the test pairs could only be ranked among training
    notes."""
    os.remove(os.path.join(root, "notes_test.csv"))


def train_test_leak(root: str) -> None:
    """A training pair naming a note of the test pairs (data without events: the given training
    pairs are used as they are)."""
    first_test = read_rows(os.path.join(root, "note_pairs_test.csv"))[0][0]
    _append(os.path.join(root, "note_pairs_train.csv"), f"{_first_id(root)},{first_test}\n")


def dotdot_image_uri(root: str) -> None:
    """Canonical layout, an image_uri that climbs out of the data folder."""
    _set_image_uri(root, "images/../../../etc/passwd")


def absolute_image_uri(root: str) -> None:
    """Canonical layout, an absolute image_uri outside the data folder."""
    _set_image_uri(root, "/etc/hostname")


def foreign_scheme_image_uri(root: str) -> None:
    """Canonical layout, an image_uri on another scheme (fetched from the network)."""
    _set_image_uri(root, "http://169.254.169.254/computeMetadata/v1/x.jpg")


CASES: dict[str, Callable[[str], None]] = {
    "gbk_notes": gbk_notes,
    "latin1_notes": latin1_notes,
    "binary_garbage_csv": binary_garbage_csv,
    "stray_quote": stray_quote,
    "huge_field": huge_field,
    "long_content": long_content,
    "csv_and_parquet": csv_and_parquet,
    "empty_notes": empty_notes,
    "unknown_pair_note": unknown_pair_note,
    "duplicate_note_id": duplicate_note_id,
    "pair_score_inf": pair_score_inf,
    "events_nan_ts": events_nan_ts,
    "events_inf_ts": events_inf_ts,
    "bomb_image": bomb_image,
    "oversize_image": oversize_image,
    "truncated_image": truncated_image,
    "no_test_notes": no_test_notes,
    "train_test_leak": train_test_leak,
    "dotdot_image_uri": dotdot_image_uri,
    "absolute_image_uri": absolute_image_uri,
    "foreign_scheme_image_uri": foreign_scheme_image_uri,
}

EXPECT: dict[str, str] = {
    "gbk_notes": r"notes_train\.csv row 1, field 'title' \(line 1, byte \d+\): .*not valid "
                 r"utf-8.*data\.encoding",
    "latin1_notes": r"notes_test\.csv row 1, field 'title' \(line 1, byte \d+\): .*not valid "
                    r"utf-8",
    "binary_garbage_csv": r"note_pairs_train\.csv row 1, field 'noteid1' \(line 1, byte 0\): "
                          r".*not valid utf-8",
    "stray_quote": r"notes_train\.csv row 2, field 'title' \(line \d+\): a quote opened",
    "huge_field": r"notes_train\.csv row 2 \(record from line \d+\): .*field longer than "
                  r"131072 characters",
    "long_content": r"content longer than max_content_chars=20000",
    "csv_and_parquet": r"notes_train\.csv and notes_train\.parquet",
    "empty_notes": r"notes_test\.csv: no notes",
    "unknown_pair_note": r"unknown note id 'nosuchnote'",
    "duplicate_note_id": r"appears more than once",
    "pair_score_inf": r"note_pairs_train\.csv row \d+, field 'score' \(line \d+\): not a "
                      r"finite number: 'inf'",
    "events_nan_ts": r"events\.csv row \d+, field 'ts': unparseable timestamp 'nan'",
    "events_inf_ts": r"events\.csv row \d+, field 'ts': unparseable timestamp 'inf'",
    "bomb_image": r"over data\.max_image_pixels=64000000: 80000000 pixels",
    "oversize_image": r"over data\.max_image_bytes=33554432: 34603008 bytes",
    "truncated_image": r"cannot be decoded",
    "no_test_notes": r"no test notes \(notes_test\.csv or notes_test\.parquet",
    "train_test_leak": r"note_pairs_test\.csv row 1, field '\w+': note '\w+' of the test pairs "
                       r"is also in the train pairs",
    "dotdot_image_uri": r"notes_train\.parquet row 1, field 'image_uri': .*'\.\.'",
    "absolute_image_uri": r"notes_train\.parquet row 1, field 'image_uri': '/etc/hostname' is "
                          r"outside the data folder",
    "foreign_scheme_image_uri": r"notes_train\.parquet row 1, field 'image_uri': .*outside the "
                                r"data folder",
}

LAYER: dict[str, str] = {name: "reader" for name in CASES} | {
    name: "validate" for name in ("long_content", "unknown_pair_note", "duplicate_note_id",
                                  "bomb_image", "oversize_image", "truncated_image",
                                  "no_test_notes", "train_test_leak")}
