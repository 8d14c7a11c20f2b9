"""Canonical notes -> model inputs, with images decoded lazily from local paths or gs://."""

from __future__ import annotations

import io
from collections.abc import Sequence

import pandas as pd
from PIL import Image

from components.common import storage
from model.prompts import NoteInput


def load_image(uri: str) -> Image.Image | None:
    if not uri:
        return None
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
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
