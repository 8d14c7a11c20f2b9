"""Canonical notes -> model inputs, with images decoded lazily from local paths or gs://.

Every image this project decodes is read under two limits (``data.max_image_bytes``,
``data.max_image_pixels``): a larger file is refused before it is read whole, a picture of more
pixels before it is decoded (a decompression bomb). Importing this module applies the default
pixel limit to Pillow itself (``Image.MAX_IMAGE_PIXELS``, and its ``DecompressionBombWarning``
made an error), so Pillow refuses such a picture wherever it is opened in a process that decodes
images (the trainer's look-alike thumbnails, the serving model) — a step with other settings
calls :func:`configure_images`.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Sequence

import pandas as pd
from PIL import Image

from components.common import storage
from components.common.config import DataConfig
from components.common.schema import DataError
from model.prompts import NoteInput

_LIMITS = {"pixels": DataConfig.max_image_pixels, "bytes": DataConfig.max_image_bytes}


class BrokenImage(DataError):
    """An image that is refused or does not decode; the message is the reason."""


def configure_images(cfg: DataConfig) -> None:
    """Apply ``data.max_image_pixels`` / ``data.max_image_bytes`` in this process."""
    _LIMITS["pixels"], _LIMITS["bytes"] = cfg.max_image_pixels, cfg.max_image_bytes
    Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels
    # Pillow only warns between the limit and twice it; here the limit is the limit
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


configure_images(DataConfig())


def read_image_bytes(uri: str) -> bytes:
    """The bytes of an image file, refused (:class:`BrokenImage`) when larger than
    ``data.max_image_bytes``: a local file by its size, a remote one by reading at most one
    byte more than the limit."""
    limit = _LIMITS["bytes"]
    if storage.is_gcs(uri):
        data = _read_gcs_head(uri, limit + 1)
        size = None
    else:
        with open(uri, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = b"" if size > limit else f.read(limit + 1)
    if (size or 0) > limit or len(data) > limit:
        # the limit first: validate's reports show the first 60 characters of a problem
        raise BrokenImage(f"over data.max_image_bytes={limit}: "
                          + (f"{size} bytes" if size else f"more than {limit} bytes")
                          + " (refused unread)")
    return data


def _read_gcs_head(uri: str, n: int) -> bytes:
    blob = storage._bucket_blob(uri)
    try:
        return blob.download_as_bytes(start=0, end=n - 1)
    except Exception as e:  # google.api_core's exceptions, without importing them here
        code = getattr(e, "code", None)
        if code == 416:  # an empty object has no byte range
            return b""
        if code == 404:
            raise FileNotFoundError(f"no such object: {uri}") from None
        raise


def open_image(data: bytes) -> Image.Image:
    """Pillow's lazily decoding image of ``data``, refused (:class:`BrokenImage`) when its
    header claims more than ``data.max_image_pixels`` pixels. Close it after use."""
    limit = _LIMITS["pixels"]
    try:
        im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own check, from the header: "Image size (N pixels) exceeds limit of ..."
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise BrokenImage(f"over data.max_image_pixels={limit}: "
                          + (f"{found[1]} pixels" if found else str(e))
                          + " (a decompression bomb; refused undecoded)") from None
    width, height = im.size
    if width * height > limit:
        im.close()
        raise BrokenImage(f"over data.max_image_pixels={limit}: {width * height} pixels "
                          f"({width}x{height}, a decompression bomb; refused undecoded)")
    return im


def load_image(uri: str) -> Image.Image | None:
    """The RGB picture at ``uri`` (None for ""); :class:`BrokenImage` (a :class:`DataError`)
    when the file is over a limit."""
    if not uri:
        return None
    with open_image(read_image_bytes(uri)) as im:
        im.load()
        return im.convert("RGB")


class LazyNotes(Sequence):
    """A sequence of :class:`NoteInput`; the image of a note is read when the note is taken."""

    def __init__(self, notes: pd.DataFrame):
        self.titles = notes["title"].tolist()
        self.contents = notes["content"].tolist()
        self.topics = [tuple(t) if t is not None else () for t in notes["topics"]]
        self.images = notes["image_uri"].tolist()

    def __len__(self) -> int:
        return len(self.titles)

    def __getitem__(self, i):
        return NoteInput(self.titles[i], self.contents[i], self.topics[i], self.image(i))

    def text(self, i: int) -> NoteInput:
        """The note without its image (no file read)."""
        return NoteInput(self.titles[i], self.contents[i], self.topics[i])

    def image(self, i: int) -> Image.Image | None:
        return load_image(self.images[i])

    def texts(self):
        for i in range(len(self)):
            yield self.text(i)
