"""The Great Expectations suites ``validate`` runs: defined here in code, versioned with the repo.

One suite per canonical table (``notes``, ``images``, each ``pairs_<name>``, ``events``). Every
expectation carries two ``meta`` entries that the engine needs to name what the user has to fix:

* ``field`` — the canonical column the failing rows are wrong in (``note_id``, ``image_uri``…);
* ``problem`` — how one failing row reads, a ``str.format`` template over that row's columns
  (those in :attr:`Table.row_columns` plus the checked column) and ``value``, the checked value.

GX checks one table at a time, so the cross-table lookups (is this pair's note known, and in
which split?) are joined in pandas here, as ``*_split`` columns the suites check against a small
value set. That keeps millions of note ids out of the suites and out of ``gx_results.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd

from components.common.config import DataConfig
from components.common.schema import EVENT_TYPES, PROVENANCE

# Bump on any change to an expectation below; recorded in every suite's meta and in the report.
SUITE_VERSION = "1"

# ``Level1@Level2@`` (any depth) or empty, as in the official release: "Emotion@Other Emotions@".
# A category that does not look like this is usually a column shift in a hand-edited CSV.
CATEGORY = r"^(?:[^@]+@)*$"

# field names of the official CSV layout, used in messages about rows that came from a .csv file
NOTE_CSV_FIELDS = {"note_id": "noteid", "image_uri": "imgid"}
PAIR_CSV_FIELDS = {"query_id": "noteid1", "target_id": "noteid2"}


@dataclass
class Table:
    """One GX batch: a frame, the suite it must meet, and how failing rows are named."""

    name: str
    frame: pd.DataFrame
    suite: gx.ExpectationSuite
    # columns GX returns for each failing row (``unexpected_index_column_names``)
    row_columns: list[str]
    # canonical column -> official CSV field name, for rows whose ``_file`` is a .csv
    csv_fields: dict[str, str] = field(default_factory=dict)


def _suite(name: str, expectations: list) -> gx.ExpectationSuite:
    return gx.ExpectationSuite(name=name, expectations=expectations,
                               meta={"suite_version": SUITE_VERSION})


def _expect(cls, *, field: str | None, problem: str, severity: str = "critical", **kwargs):
    return cls(meta={"field": field, "problem": problem}, severity=severity, **kwargs)


def _mostly(max_bad_share: float) -> float:
    return min(1.0, max(0.0, 1.0 - max_bad_share))


# -- suites ------------------------------------------------------------------------------------


def notes_suite(cfg: DataConfig) -> gx.ExpectationSuite:
    """All notes of all splits together (a note id must be unique across splits)."""
    return _suite("notes", [
        _expect(gxe.ExpectColumnValuesToNotBeNull, column="note_id", field="note_id",
                problem="missing note id"),
        _expect(gxe.ExpectColumnValuesToBeUnique, column="note_id", field="note_id",
                problem="note id {value!r} appears more than once"),
        _expect(gxe.ExpectColumnValueLengthsToBeBetween, column="title", field="title",
                max_value=cfg.max_title_chars,
                problem=f"title longer than max_title_chars={cfg.max_title_chars}: {{value!r}}"),
        _expect(gxe.ExpectColumnValueLengthsToBeBetween, column="content", field="content",
                max_value=cfg.max_content_chars,
                problem=f"content longer than max_content_chars={cfg.max_content_chars}: "
                        "{value!r}"),
        # the share of empty texts, as the share of rows with a length below 1
        _expect(gxe.ExpectColumnValueLengthsToBeBetween, column="title", field="title",
                min_value=1, mostly=_mostly(cfg.max_empty_title_share),
                problem="empty title (note {note_id!r})"),
        _expect(gxe.ExpectColumnValueLengthsToBeBetween, column="content", field="content",
                min_value=1, mostly=_mostly(cfg.max_empty_content_share),
                problem="empty content (note {note_id!r})"),
        _expect(gxe.ExpectColumnValueLengthsToBeBetween, column="image_uri", field="image_uri",
                min_value=1, mostly=_mostly(cfg.max_broken_image_share),
                problem="no image file found for note {note_id!r} (imgid {imgid!r})"),
        _expect(gxe.ExpectColumnValuesToMatchRegex, column="category", field="category",
                regex=CATEGORY,
                problem="category {value!r} is neither empty nor 'Level1@Level2@'"),
    ])


def images_suite(cfg: DataConfig) -> gx.ExpectationSuite:
    """One row per note that names an image: did its file open and fully decode?"""
    return _suite("images", [
        _expect(gxe.ExpectColumnValuesToBeInSet, column="decodes", value_set=[True],
                mostly=_mostly(cfg.max_broken_image_share), field="image_uri",
                problem="image {image_uri} of note {note_id!r}: {problem}"),
    ])


def pairs_suite(name: str, known_splits: list[str], scope: str, min_rows: int | None
                ) -> gx.ExpectationSuite:
    """One pair table. ``known_splits``: the note splits its ids may come from."""
    expectations = [
        _expect(gxe.ExpectColumnValuesToBeInSet, column=f"{col}_split", value_set=known_splits,
                field=col, problem=f"unknown note id {{{col}!r}} (not in {scope})")
        for col in ("query_id", "target_id")
    ] + [
        # training drops both; reported, not fatal
        _expect(gxe.ExpectSelectColumnValuesToBeUniqueWithinRecord, severity="warning",
                column_list=["query_id", "target_id"], field="target_id",
                problem="self-pair {query_id!r} (dropped by training)"),
        _expect(gxe.ExpectCompoundColumnsToBeUnique, severity="warning",
                column_list=["query_id", "target_id"], field="target_id",
                problem="duplicate pair ({query_id!r}, {target_id!r})"),
    ]
    if min_rows is not None:
        expectations.append(_expect(gxe.ExpectTableRowCountToBeBetween, min_value=min_rows,
                                    field=None, problem="too few pairs"))
    return _suite(f"pairs_{name}", expectations)


def events_suite(cfg: DataConfig, known_splits: list[str]) -> gx.ExpectationSuite:
    return _suite("events", [
        _expect(gxe.ExpectColumnValuesToNotBeNull, column="user_id", field="user_id",
                problem="missing user id"),
        _expect(gxe.ExpectColumnValuesToBeInSet, column="event", value_set=list(EVENT_TYPES),
                field="event",
                problem=f"unknown event {{value!r}} (expected {', '.join(EVENT_TYPES)})"),
        _expect(gxe.ExpectColumnValuesToNotBeNull, column="ts_parsed", field="ts",
                problem="unparseable timestamp {ts!r}"),
        _expect(gxe.ExpectColumnValuesToBeInSet, column="note_id_split", value_set=known_splits,
                mostly=cfg.min_known_event_note_share, field="note_id",
                problem="unknown note id {note_id!r} (not in any notes file)"),
    ])


# -- the frames the suites check ---------------------------------------------------------------


def notes_frame(notes: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """All splits, with ``split``; ``imgid`` is "" where the layout has none."""
    cols = ["note_id", "title", "content", "image_uri", "category", "imgid", *PROVENANCE]
    frames = [df.assign(split=split, imgid=df.get("imgid", ""))[cols + ["split"]]
              for split, df in notes.items()]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols + ["split"]})
    return pd.concat(frames, ignore_index=True)


def _split_of(ids: pd.Series, split_by_id: pd.Series) -> pd.Series:
    return ids.map(split_by_id).fillna("").astype(str)


def pairs_frame(df: pd.DataFrame, split_by_id: pd.Series) -> pd.DataFrame:
    out = df[["query_id", "target_id", *PROVENANCE]].copy()
    for col in ("query_id", "target_id"):
        out[f"{col}_split"] = _split_of(out[col], split_by_id)
    return out


def events_frame(events: pd.DataFrame, split_by_id: pd.Series) -> pd.DataFrame:
    out = events[["user_id", "note_id", "event", "ts", *PROVENANCE]].copy()
    out["ts_parsed"] = pd.to_datetime(out["ts"], errors="coerce", utc=True)
    out["ts"] = out["ts"].astype(str)  # the value as written, for messages
    out["note_id_split"] = _split_of(out["note_id"], split_by_id)
    return out


def tables(notes: dict[str, pd.DataFrame], pairs: dict[str, pd.DataFrame],
           events: pd.DataFrame | None, images: pd.DataFrame, cfg: DataConfig,
           allnotes: pd.DataFrame | None = None) -> list[Table]:
    """Every table with its suite. ``images``: :func:`components.validate.images.check_images`;
    ``allnotes``: :func:`notes_frame` of ``notes`` when the caller already has it (not built
    twice)."""
    allnotes = notes_frame(notes) if allnotes is None else allnotes
    split_by_id = allnotes.drop_duplicates("note_id").set_index("note_id")["split"]
    splits = sorted(notes)
    out = [
        Table("notes", allnotes, notes_suite(cfg), ["_file", "_row", "note_id", "imgid"],
              NOTE_CSV_FIELDS),
        Table("images", images, images_suite(cfg),
              ["_file", "_row", "note_id", "image_uri", "problem"], NOTE_CSV_FIELDS),
    ]
    minimum = {"train": cfg.min_train_pairs, "test": cfg.min_test_pairs}
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in ["query_id", "target_id"]}
                         | {"_file": pd.Series(dtype=object), "_row": pd.Series(dtype=int)})
    for name in sorted(set(pairs) | set(minimum)):  # a missing train/test file counts 0 pairs
        is_test = name == "test" or name.startswith("test_")
        known, scope = ((["test"], "notes_test") if is_test and "test" in notes
                        else (splits, "any notes file"))
        out.append(Table(f"pairs_{name}", pairs_frame(pairs.get(name, empty), split_by_id),
                         pairs_suite(name, known, scope, minimum.get(name)),
                         ["_file", "_row", "query_id", "target_id"], PAIR_CSV_FIELDS))
    if events is not None:
        out.append(Table("events", events_frame(events, split_by_id), events_suite(cfg, splits),
                         ["_file", "_row", "user_id", "note_id", "ts"]))
    return out
