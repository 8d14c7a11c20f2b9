"""Open and fully decode every referenced image, in parallel, with a progress bar.

The result is a table (one row per note that names an image) that the ``images`` suite checks,
so broken images appear in the GX result and the Data Docs like any other failing row.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
from tqdm.auto import tqdm

from components.common.notes import BrokenImage, open_image, read_image_bytes

# magic numbers of the formats we accept, checked before Pillow sees the bytes
_MAGIC: list[tuple[str, Callable[[bytes], bool]]] = [
    ("jpeg", lambda b: b[:3] == b"\xff\xd8\xff"),
    ("png", lambda b: b[:8] == b"\x89PNG\r\n\x1a\n"),
    ("webp", lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP"),
    ("gif", lambda b: b[:6] in (b"GIF87a", b"GIF89a")),
    ("bmp", lambda b: b[:2] == b"BM"),
]
COLUMNS = ["note_id", "image_uri", "decodes", "problem", "width", "height", "mode", "_file",
           "_row"]


def sniff(data: bytes) -> str | None:
    return next((name for name, test in _MAGIC if test(data)), None)


def check_image(uri: str) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """(problem, size, mode) for one image file. Refused without decoding: a file larger than
    ``data.max_image_bytes``, a picture of more than ``data.max_image_pixels`` pixels (see
    :func:`components.common.notes.configure_images`)."""
    try:
        data = read_image_bytes(uri)
    except BrokenImage as e:
        return str(e), None, None
    except (OSError, ValueError) as e:
        return f"cannot be read ({e.__class__.__name__}: {e})", None, None
    if not data:
        return "empty file (0 bytes)", None, None
    if sniff(data) is None:
        return f"not an image (starts with {data[:8]!r})", None, None
    try:
        with open_image(data) as im:
            im.load()  # a full decode: catches truncated files
            return None, im.size, im.mode
    except BrokenImage as e:
        return str(e), None, None
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for corrupt data
        return f"cannot be decoded ({e.__class__.__name__}: {e})", None, None


def check_images(notes: pd.DataFrame, workers: int) -> pd.DataFrame:
    """One row per note with an ``image_uri``: ``decodes``, ``problem`` ("" when it decodes),
    ``width``, ``height``, ``mode``. Each distinct file is read once."""
    present = notes[notes["image_uri"] != ""]
    uris = present["image_uri"].drop_duplicates().tolist()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = dict(zip(uris, tqdm(pool.map(check_image, uris), total=len(uris),
                                      desc="check images", unit="img"), strict=True))
    checked = [results[u] for u in present["image_uri"]]
    return pd.DataFrame({
        "note_id": present["note_id"].to_numpy(),
        "image_uri": present["image_uri"].to_numpy(),
        "decodes": [p is None for p, _, _ in checked],
        "problem": [p or "" for p, _, _ in checked],
        "width": pd.array([s[0] if s else None for _, s, _ in checked], dtype="Int64"),
        "height": pd.array([s[1] if s else None for _, s, _ in checked], dtype="Int64"),
        "mode": [m or "" for _, _, m in checked],
        "_file": present["_file"].to_numpy(),
        "_row": present["_row"].to_numpy(),
    }, columns=COLUMNS)
