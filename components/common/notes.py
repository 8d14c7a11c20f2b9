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
import math
import mmap
import multiprocessing
import os
import re
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
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


class PixelCache:
    """Preprocessed pixels of notes, up to one byte budget per process (``train.pixel_cache_mb``,
    ``embed.pixel_cache_mb``): a kept note's photo is decoded and resized once, then read from
    here in every later batch and epoch (a 2560 px WebP costs ~0.1 s to decode).

    The pixels live in an anonymous shared memory map made here, so the DataLoader workers
    forked from this process fill and read the same slots: a note one worker decoded is a hit
    for all of them, the budget is not multiplied by the workers, and nothing is lost when an
    epoch's workers exit. Pages are committed only as slots fill. Slots go to notes first come,
    first served; once the budget is spent, other notes are decoded each time they are taken.
    Shared by fork only (the DataLoader's start method on Linux): the cache refuses pickling.
    """

    def __init__(self, notes: LazyNotes, collator, max_bytes: int,
                 keep: np.ndarray | None = None):
        """``keep``: a boolean mask of the notes that may be kept (default all), e.g. only those
        that will be taken again."""
        self.notes, self.collator = notes, collator
        self.keep = None if keep is None else np.asarray(keep, dtype=bool)
        self.shape = tuple(collator.pixel_shape)  # (3, H, W)
        self.item_bytes = 4 * math.prod(self.shape)  # float32
        wanted = len(notes) if self.keep is None else int(self.keep.sum())
        self.capacity = min(wanted, max(0, int(max_bytes)) // self.item_bytes)
        self._pixel_map = mmap.mmap(-1, max(1, self.capacity * self.item_bytes))  # shared, anon
        self.pixels = (torch.frombuffer(self._pixel_map, dtype=torch.float32,
                                        count=self.capacity * math.prod(self.shape))
                       .view(self.capacity, *self.shape) if self.capacity
                       else torch.zeros((0, *self.shape)))  # (capacity, 3, H, W)
        # slot[k] = 1 + row of note k in ``pixels`` (0: not kept); then slots used, notes decoded
        self._slot_map = mmap.mmap(-1, 8 * (len(notes) + 2))
        self._slot = np.frombuffer(self._slot_map, dtype=np.int64)
        self._lock = multiprocessing.Lock()

    def __reduce__(self):
        raise TypeError("a PixelCache is shared with forked processes only (it holds a shared "
                        "memory map); use the fork start method")

    @property
    def kept(self) -> int:
        """Notes whose pixels are kept (by this process and its workers together)."""
        return int(self._slot[-2])

    @property
    def bytes(self) -> int:
        return self.kept * self.item_bytes

    @property
    def decoded(self) -> int:
        """Images decoded through this cache so far, by this process and its workers."""
        return int(self._slot[-1])

    def get(self, keys: Sequence[int]) -> torch.Tensor:
        """(len(keys), 3, H, W) pixels of the notes at ``keys`` (positions in ``notes``)."""
        keys = [int(k) for k in keys]
        slot = self._slot
        missing = [k for k in dict.fromkeys(keys) if slot[k] == 0]
        fresh = {}
        if missing:
            px = self.collator.pixels([self.notes.image(k) for k in missing])
            fresh = dict(zip(missing, px, strict=True))
            with self._lock:  # slots are handed out by one process at a time
                slot[-1] += len(missing)
                for k, t in fresh.items():
                    used = int(slot[-2])
                    if (slot[k] == 0 and used < self.capacity
                            and (self.keep is None or self.keep[k])):
                        self.pixels[used] = t
                        slot[k] = used + 1  # after the pixels: a reader never sees a bare slot
                        slot[-2] = used + 1
        out = torch.empty((len(keys), *self.shape), dtype=torch.float32)  # (B, 3, H, W)
        for i, k in enumerate(keys):
            out[i] = fresh[k] if k in fresh else self.pixels[slot[k] - 1]
        return out
