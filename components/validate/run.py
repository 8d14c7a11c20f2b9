"""validate: the Great Expectations suites that must hold before any training starts.

The suites are code (:mod:`components.validate.suites`), run in an ephemeral GX context
(:mod:`components.validate.engine`). A failed critical expectation stops the pipeline with
:class:`DataError` naming the expectation, the observed value and example rows by file, row and
field; warnings are reported and the run goes on. Notes whose image is missing or broken are
dropped only within ``max_broken_image_share``, and listed in ``dropped_notes.json``.

Writes to ``out_dir``: ``validation.json``, ``summary.md``, ``gx_results.json`` (GX's results),
``data_docs.html`` (one self-contained page, see :mod:`components.validate.docs`),
``dropped_notes.json`` (only when validation passes) and ``images.parquet`` (size and mode of
every checked image).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import pandas as pd

from components.common import storage
from components.common.canonical import derive_canonical, evaluation_errors, load_canonical
from components.common.config import DataConfig
from components.common.notes import configure_images
from components.common.readers import read_table, write_table
from components.common.schema import EVENT_COLUMNS, PROVENANCE, DataError, where
from components.validate import docs, engine
from components.validate.engine import Outcome
from components.validate.images import check_images
from components.validate.suites import NOTE_CSV_FIELDS, SUITE_VERSION, Table, notes_frame, tables

log = logging.getLogger(__name__)
MAX_LISTED = 20


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, object] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    # notes with a missing or broken image; ``dropped`` only when validation passes
    without_image: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return not self.errors

    def markdown(self) -> str:
        lines = ["# Data validation", "", f"**{'passed' if self.success else 'FAILED'}** "
                 f"(Great Expectations suites version {SUITE_VERSION})", "",
                 "| suite | expectations | passed | failed | warnings |",
                 "| --- | --- | --- | --- | --- |"]
        for s in dict.fromkeys(o.suite for o in self.outcomes):
            mine = [o for o in self.outcomes if o.suite == s]
            lines.append(f"| {s} | {len(mine)} | {sum(o.success for o in mine)} | "
                         f"{sum(o.fatal for o in mine)} | "
                         f"{sum(not o.success and not o.fatal for o in mine)} |")
        lines.append("")
        if self.errors:
            lines += ["## Errors", ""] + [f"- {e}" for e in self.errors] + [""]
        if self.warnings:
            lines += ["## Warnings", ""] + [f"- {w}" for w in self.warnings] + [""]
        if self.dropped:
            lines += [f"## Dropped notes ({len(self.dropped)}, all in dropped_notes.json)", ""]
            lines += [f"- {d['note_id']}: {d['where']}: {d['problem']}"
                      for d in self.dropped[:MAX_LISTED]] + [""]
        lines += ["## Statistics", "", "| statistic | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in self.stats.items()]
        return "\n".join(lines) + "\n"


def run(canonical_dir: str, out_dir: str, cfg: DataConfig, validated_dir: str = "",
        raise_on_failure: bool = True) -> Report:
    """Validate the canonical folder; on success and with ``validated_dir``, write there the
    folder the later steps use: the same data without the dropped notes and their pairs.
    A failed validation raises :class:`DataError` (:func:`failure_message`) after writing the
    reports, or with ``raise_on_failure=False`` returns the report (``success`` False): the
    pipeline's validate task does that, so its Data Docs reach the UI, and a gate task fails."""
    configure_images(cfg)
    notes, pairs, manifest = load_canonical(canonical_dir)
    events = (read_table(storage.join(canonical_dir, "events.parquet"),
                         EVENT_COLUMNS + PROVENANCE)  # only what the events suite checks
              if manifest.get("events") is not None else None)
    start = time.perf_counter()
    allnotes = notes_frame(notes)  # one frame of every split, for the images and the suites
    images = check_images(allnotes, cfg.image_check_workers)
    checked = time.perf_counter()
    todo = tables(notes, pairs, events, images, cfg, allnotes)
    del allnotes
    results = engine.validate(todo)
    rep = report(todo, results, cfg)
    rep.errors += evaluation_errors(notes, pairs)
    rep.stats |= {"seconds_images": round(checked - start, 2),
                  "seconds_gx": round(time.perf_counter() - checked, 2)}
    if validated_dir and rep.success:  # first, so the reports count the pairs it drops
        _write_validated(canonical_dir, validated_dir, notes, pairs, rep)
    _write(out_dir, rep, todo, results)
    for w in rep.warnings:
        log.warning(w)
    if rep.errors:
        if raise_on_failure:
            raise DataError(failure_message(rep))
        log.error(failure_message(rep))
        return rep
    log.info("validation passed: %s", rep.stats)
    return rep


def failure_message(rep: Report) -> str:
    """What a failed validation raises: every error, naming expectation, file, row and field."""
    return (f"data validation failed ({len(rep.errors)} expectation(s); details in summary.md "
            "and data_docs.html):\n  " + "\n  ".join(rep.errors))


def _write_validated(canonical_dir: str, validated_dir: str, notes: dict[str, pd.DataFrame],
                     pairs: dict[str, pd.DataFrame], rep: Report) -> None:
    gone = {d["note_id"] for d in rep.dropped}
    if not gone:
        derive_canonical(canonical_dir, validated_dir, note={"validation": {"dropped_notes": 0}})
        return
    keep_pairs = {k: v[~(v["query_id"].isin(gone) | v["target_id"].isin(gone))]
                  for k, v in pairs.items()}
    lost = {k: len(pairs[k]) - len(v) for k, v in keep_pairs.items() if len(pairs[k]) - len(v)}
    rep.stats |= {f"pairs_dropped_{k}": n for k, n in lost.items()}
    derive_canonical(canonical_dir, validated_dir,
                     notes={k: v[~v["note_id"].isin(gone)] for k, v in notes.items()},
                     pairs=keep_pairs,
                     note={"validation": {"dropped_notes": len(gone), "dropped_pairs": lost}})
    log.warning("%d note(s) dropped for a missing or broken image, with %d pair(s) naming them",
                len(gone), sum(lost.values()))


def report(todo: list[Table], results: dict[str, dict], cfg: DataConfig) -> Report:
    """Errors, warnings, dropped notes and statistics from the GX results."""
    by_name = {t.name: t.frame for t in todo}
    rep = Report(stats=_statistics(by_name))
    for t in todo:
        found = engine.outcomes(t, results[t.name])
        rep.outcomes += found
        rep.errors += [o.text() for o in found if o.fatal]
        rep.warnings += [o.text() for o in found if not o.success and not o.fatal]
        rep.stats[f"suite_{t.name}_success"] = int(not any(o.fatal for o in found))
    rep.without_image = lost = _without_image(by_name["notes"], by_name["images"])
    rep.stats["notes_without_usable_image"] = len(lost)
    if lost and rep.success:
        # within tolerance: the notes go, loudly, and the list travels with the report
        rep.dropped = lost
        rep.warnings.append(
            f"{len(lost)} note(s) without a usable image, within tolerance "
            f"(max_broken_image_share={cfg.max_broken_image_share}); dropped, listed in "
            "dropped_notes.json: " + "; ".join(f"{d['where']}: {d['problem']}"
                                              for d in lost[:5]))
    rep.stats["notes_dropped"] = len(rep.dropped)
    return rep


def _without_image(notes: pd.DataFrame, images: pd.DataFrame) -> list[dict]:
    def place(file: str, row: int) -> str:
        return where(file, int(row), NOTE_CSV_FIELDS["image_uri"] if file.endswith(".csv")
                     else "image_uri")

    missing = notes[notes["image_uri"] == ""]
    broken = images[~images["decodes"]]
    return ([{"note_id": n, "where": place(f, r), "problem": "no image file found"}
             for n, f, r in zip(missing["note_id"], missing["_file"], missing["_row"],
                                strict=True)]
            + [{"note_id": n, "where": place(f, r), "problem": f"image {u}: {p}"}
               for n, f, r, u, p in zip(broken["note_id"], broken["_file"], broken["_row"],
                                        broken["image_uri"], broken["problem"], strict=True)])


def _statistics(frames: dict[str, pd.DataFrame]) -> dict[str, object]:
    """Counts and shares (numbers, so the component can log them to MLflow)."""
    notes, images = frames["notes"], frames["images"]
    stats: dict[str, object] = {f"notes_{s}": int(n) for s, n in
                                notes["split"].value_counts(sort=False).items()}
    stats["notes"] = len(notes)
    if len(notes):
        stats["empty_title_share"] = round(float((notes["title"] == "").mean()), 4)
        stats["empty_content_share"] = round(float((notes["content"] == "").mean()), 4)
        stats["missing_image_share"] = round(float((notes["image_uri"] == "").mean()), 4)
    stats["images_checked"] = int(images["image_uri"].nunique())
    stats["broken_image_share"] = (round(float((~images["decodes"]).mean()), 4) if len(images)
                                   else 0.0)
    ok = images[images["decodes"]].drop_duplicates("image_uri")
    if len(ok):
        stats["image_width_median"] = int(ok["width"].median())
        stats["image_height_median"] = int(ok["height"].median())
        stats["image_modes"] = ", ".join(f"{k}: {v}" for k, v in ok["mode"].value_counts().items())
    for name, df in frames.items():
        if name.startswith("pairs_"):
            stats[name] = len(df)
            stats[f"{name}_self"] = int((df["query_id"] == df["target_id"]).sum())
            stats[f"{name}_duplicates"] = int(df.duplicated(["query_id", "target_id"]).sum())
    if "events" in frames:
        events = frames["events"]
        stats["events"] = len(events)
        stats["known_event_note_share"] = (round(float((events["note_id_split"] != "").mean()), 4)
                                           if len(events) else 1.0)
    return stats


def _write(out_dir: str, rep: Report, todo: list[Table], results: dict[str, dict]) -> None:
    import great_expectations as gx

    def put(name: str, text: str) -> None:
        storage.write_text(storage.join(out_dir, name), text)

    put("gx_results.json", json.dumps({"suite_version": SUITE_VERSION, "results": results},
                                      indent=1, default=str))
    put("validation.json", json.dumps(
        {"success": rep.success, "suite_version": SUITE_VERSION, "errors": rep.errors,
         "warnings": rep.warnings, "statistics": rep.stats,
         "suites": {t.name: results[t.name]["statistics"] for t in todo},
         "notes_without_usable_image": rep.without_image[:1000]},
        indent=2, default=str))
    put("summary.md", rep.markdown())
    put("data_docs.html", docs.render(
        success=rep.success, outcomes=rep.outcomes, rows={t.name: len(t.frame) for t in todo},
        stats=rep.stats, dropped=rep.dropped, suite_version=SUITE_VERSION,
        gx_version=gx.__version__))
    images = next(t.frame for t in todo if t.name == "images")
    write_table(images, storage.join(out_dir, "images.parquet"))
    if rep.success:
        put("dropped_notes.json", json.dumps(
            {"reason": "missing or broken image, within data.max_broken_image_share",
             "note_ids": [d["note_id"] for d in rep.dropped], "notes": rep.dropped}, indent=2))
