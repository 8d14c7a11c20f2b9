"""Open and fully decode every referenced image, in parallel, with a progress bar.

The result is a table (one row per note that names an image) that the ``images`` suite checks,
so broken images appear in the GX result and the Data Docs like any other failing row.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
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
    ``width``, ``height``, ``mode``. Each distinct file is read once, one at a time per worker
    and a bounded batch in flight (no image's bytes or pixels outlive its check); what is kept
    per file is its problem, size and mode."""
    present = notes[notes["image_uri"] != ""]
    codes, uris = pd.factorize(present["image_uri"])  # codes: (notes,) index into uris
    n = len(uris)
    problem = np.full(n, "", dtype=object)
    mode = np.full(n, "", dtype=object)
    size = np.zeros((n, 2), dtype=np.int64)  # (files, width/height)
    sized = np.zeros(n, dtype=bool)
    workers = max(1, workers)
    batch = 64 * workers  # checks submitted at a time: bounded however many images there are
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=n, desc="check images", unit="img") as bar:
        for lo in range(0, n, batch):
            part = uris[lo:lo + batch]
            for i, (p, wh, m) in enumerate(pool.map(check_image, part), start=lo):
                problem[i], mode[i] = p or "", m or ""
                if wh:
                    size[i], sized[i] = wh, True
            bar.update(len(part))
    decodes = problem == ""
    return pd.DataFrame({
        "note_id": present["note_id"].to_numpy(),
        "image_uri": present["image_uri"].to_numpy(),
        "decodes": decodes[codes],
        "problem": problem[codes],
        "width": pd.arrays.IntegerArray(size[codes, 0], ~sized[codes]),
        "height": pd.arrays.IntegerArray(size[codes, 1], ~sized[codes]),
        "mode": mode[codes],
        "_file": present["_file"].to_numpy(),
        "_row": present["_row"].to_numpy(),
    }, columns=COLUMNS)
