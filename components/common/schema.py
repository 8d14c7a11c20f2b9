"""The canonical tables every step after ingest reads (DESIGN.md, "Canonical data").

Two provenance columns, ``_file`` and ``_row``, travel with every row so that a problem found
anywhere downstream can still name the file and row the user has to fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pandas as pd

NOTE_COLUMNS = ["note_id", "title", "content", "topics", "image_uri", "category"]
PAIR_COLUMNS = ["query_id", "target_id", "score"]
EVENT_COLUMNS = ["user_id", "note_id", "event", "ts"]
PROVENANCE = ["_file", "_row"]
EVENT_TYPES = ("view", "click")

# The official NoteLLM notes file: headerless rows of these five fields.
OFFICIAL_NOTE_FIELDS = ["noteid", "title", "content", "imgid", "category"]
OFFICIAL_PAIR_FIELDS = ["noteid1", "noteid2"]

# Inline topic tags of the official data: "#CottonDoll[话题]#".
TOPIC_TAG = re.compile(r"#([^#\[\]\n]{1,64}?)\[话题\]#")


class DataError(ValueError):
    """Bad input data. The message names the file, the row and the field to fix."""


def where(file: str, row: int | None = None, fld: str | None = None) -> str:
    """``notes_train.csv row 7, field 'imgid'`` — the prefix of every data error."""
    text = file
    if row is not None:
        text += f" row {row}"
    if fld is not None:
        text += f", field {fld!r}"
    return text


def split_topics(content: str) -> tuple[str, list[str]]:
    """Pull inline ``#topic[话题]#`` tags out of content; returns (content without tags, topics)."""
    topics: list[str] = []
    for name in TOPIC_TAG.findall(content):
        name = name.strip()
        if name and name not in topics:
            topics.append(name)
    stripped = TOPIC_TAG.sub(" ", content)
    stripped = re.sub(r"[ \t]+", " ", stripped)
    stripped = "\n".join(line.strip() for line in stripped.splitlines()).strip()
    return stripped, topics


@dataclass
class NoteDataset:
    """Canonical tables of one data folder.

    ``notes`` maps a split (``train``, ``test``) to its notes; ``pairs`` maps a pair-file name
    (``train``, ``val``, ``test``, ``test_<slice>``) to its pairs.
    """

    notes: dict[str, pd.DataFrame]
    pairs: dict[str, pd.DataFrame]
    events: pd.DataFrame | None = None
    layout: str = "canonical"
    source: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def slices(self) -> list[str]:
        return sorted(k[len("test_"):] for k in self.pairs if k.startswith("test_"))

    def all_notes(self) -> pd.DataFrame:
        frames = [df.assign(split=split) for split, df in self.notes.items()]
        return pd.concat(frames, ignore_index=True) if frames else empty_notes()


def empty_notes() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in NOTE_COLUMNS + PROVENANCE})
