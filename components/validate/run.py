"""validate: the checks that must hold before any training starts.

Every problem names the file, row and field. A failing check stops the pipeline with
:class:`DataError`; warnings are reported and the run goes on.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from components.common import storage
from components.common.canonical import load_canonical
from components.common.config import DataConfig
from components.common.schema import DataError, where

log = logging.getLogger(__name__)
MAX_EXAMPLES = 10

# magic numbers of the formats we accept, checked before Pillow sees the bytes
_MAGIC: list[tuple[str, Callable[[bytes], bool]]] = [
    ("jpeg", lambda b: b[:3] == b"\xff\xd8\xff"),
    ("png", lambda b: b[:8] == b"\x89PNG\r\n\x1a\n"),
    ("webp", lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP"),
    ("gif", lambda b: b[:6] in (b"GIF87a", b"GIF89a")),
    ("bmp", lambda b: b[:2] == b"BM"),
]


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, object] = field(default_factory=dict)

    def fail(self, check: str, problems: list[str]) -> None:
        if problems:
            shown = problems[:MAX_EXAMPLES]
            more = f" (and {len(problems) - len(shown)} more)" if len(problems) > len(shown) else ""
            self.errors.append(f"{check}: {len(problems)} problem(s){more}\n    "
                               + "\n    ".join(shown))

    def markdown(self) -> str:
        lines = ["# Data validation", "", f"**{'FAILED' if self.errors else 'passed'}**", ""]
        if self.errors:
            lines += ["## Errors", ""] + [f"- {e}" for e in self.errors] + [""]
        if self.warnings:
            lines += ["## Warnings", ""] + [f"- {w}" for w in self.warnings] + [""]
        lines += ["## Statistics", "", "| statistic | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in self.stats.items()]
        return "\n".join(lines) + "\n"


def sniff(data: bytes) -> str | None:
    return next((name for name, test in _MAGIC if test(data)), None)


def check_image(uri: str) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """(problem, size, mode) for one image file."""
    try:
        data = storage.read_bytes(uri)
    except (OSError, ValueError) as e:
        return f"cannot be read ({e.__class__.__name__}: {e})", None, None
    if not data:
        return "empty file (0 bytes)", None, None
    if sniff(data) is None:
        return f"not an image (starts with {data[:8]!r})", None, None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode: catches truncated files
            return None, im.size, im.mode
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for corrupt data
        return f"cannot be decoded ({e.__class__.__name__}: {e})", None, None


def _check_notes(notes: dict[str, pd.DataFrame], rep: Report) -> None:
    allnotes = pd.concat(notes.values(), ignore_index=True)
    dup = allnotes[allnotes.duplicated("note_id", keep=False)]
    problems = []
    for note_id, group in dup.groupby("note_id", sort=False):
        places = "; ".join(where(f, r) for f, r in zip(group["_file"], group["_row"], strict=True))
        problems.append(f"{places}, field 'noteid': note id {note_id!r} appears {len(group)} times")
    rep.fail("duplicate note ids", problems)
    for split, df in notes.items():
        rep.stats[f"notes_{split}"] = len(df)
        if len(df):
            rep.stats[f"notes_{split} empty titles"] = f"{(df['title'] == '').mean():.1%}"
            rep.stats[f"notes_{split} empty contents"] = f"{(df['content'] == '').mean():.1%}"


def _check_pairs(notes: dict[str, pd.DataFrame], pairs: dict[str, pd.DataFrame], cfg: DataConfig,
                 rep: Report) -> None:
    known_all = set().union(*(set(df["note_id"]) for df in notes.values())) if notes else set()
    test_ids = set(notes["test"]["note_id"]) if "test" in notes else known_all
    problems: list[str] = []
    for name, df in pairs.items():
        is_test = name == "test" or name.startswith("test_")
        known = test_ids if is_test else known_all
        scope = "notes_test" if is_test and "test" in notes else "any notes file"
        for col, fld in (("query_id", "noteid1"), ("target_id", "noteid2")):
            bad = df[~df[col].isin(known)]
            problems += [f"{where(f, r, fld)}: unknown note id {v!r} (not in {scope})"
                         for f, r, v in zip(bad["_file"], bad["_row"], bad[col], strict=True)]
        selfp = df[df["query_id"] == df["target_id"]]
        if len(selfp):
            rep.warnings.append(f"{df['_file'].iloc[0]}: {len(selfp)} self-pair(s), ignored "
                                f"(first at row {selfp['_row'].iloc[0]})")
        dups = int(df.duplicated(["query_id", "target_id"]).sum())
        if dups:
            rep.warnings.append(f"{df['_file'].iloc[0]}: {dups} duplicate pair(s)")
        rep.stats[f"pairs_{name}"] = len(df)
    rep.fail("pairs naming unknown notes", problems)
    for name, minimum in (("train", cfg.min_train_pairs), ("test", cfg.min_test_pairs)):
        n = len(pairs.get(name, []))
        if n < minimum:
            rep.fail("minimum pair count", [f"note_pairs_{name}: {n} pair(s), at least {minimum} "
                                            "needed"])


def _check_images(notes: dict[str, pd.DataFrame], cfg: DataConfig, rep: Report) -> None:
    allnotes = pd.concat(notes.values(), ignore_index=True)
    missing = allnotes[allnotes["image_uri"] == ""]
    problems = [f"{where(f, r, 'imgid')}: no image file found for note {n!r}"
                f"{' (imgid ' + repr(i) + ')' if isinstance(i, str) and i else ''}"
                for f, r, n, i in zip(missing["_file"], missing["_row"], missing["note_id"],
                                      missing.get("imgid", [""] * len(missing)), strict=True)]
    present = allnotes[allnotes["image_uri"] != ""]
    uris = present["image_uri"].drop_duplicates().tolist()
    with ThreadPoolExecutor(max_workers=max(1, cfg.image_check_workers)) as pool:
        results = dict(zip(uris, tqdm(pool.map(check_image, uris), total=len(uris),
                                      desc="check images", unit="img"),
                           strict=True))
    for f, r, n, u in zip(present["_file"], present["_row"], present["note_id"],
                          present["image_uri"], strict=True):
        problem = results[u][0]
        if problem:
            problems.append(f"{where(f, r, 'imgid')}: image {u} of note {n!r}: {problem}")
    sizes = [s for _, s, _ in results.values() if s]
    modes = pd.Series([m for _, _, m in results.values() if m]).value_counts().to_dict()
    rep.stats["images checked"] = len(uris)
    if sizes:
        rep.stats["image width median"] = int(pd.Series([s[0] for s in sizes]).median())
        rep.stats["image height median"] = int(pd.Series([s[1] for s in sizes]).median())
        rep.stats["image modes"] = ", ".join(f"{k}: {v}" for k, v in modes.items())
    share = len(problems) / max(1, len(allnotes))
    rep.stats["broken or missing images"] = f"{len(problems)} ({share:.2%})"
    if share > cfg.max_broken_image_share:
        rep.fail(f"broken or missing images (tolerance {cfg.max_broken_image_share:.2%})",
                 problems)
    elif problems:
        rep.warnings.append(f"{len(problems)} broken or missing image(s) within tolerance; those "
                            "notes are encoded without an image: " + "; ".join(problems[:5]))


def run(canonical_dir: str, out_dir: str, cfg: DataConfig) -> Report:
    notes, pairs, _ = load_canonical(canonical_dir)
    rep = Report()
    _check_notes(notes, rep)
    _check_pairs(notes, pairs, cfg, rep)
    _check_images(notes, cfg, rep)
    storage.write_text(storage.join(out_dir, "validation.json"), json.dumps(
        {"success": not rep.errors, "errors": rep.errors, "warnings": rep.warnings,
         "statistics": rep.stats}, indent=2, default=str))
    storage.write_text(storage.join(out_dir, "summary.md"), rep.markdown())
    for w in rep.warnings:
        log.warning(w)
    if rep.errors:
        raise DataError("data validation failed:\n  " + "\n  ".join(rep.errors))
    log.info("validation passed: %s", rep.stats)
    return rep
