"""Load the canonical folder that ``ingest`` wrote."""

from __future__ import annotations

import json

import pandas as pd

from components.common import storage
from components.common.readers import read_table, write_table
from components.common.schema import where


def load_canonical(canonical_dir: str) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame],
                                                 dict]:
    """(notes by split, pairs by name, manifest)."""
    manifest = json.loads(storage.read_text(storage.join(canonical_dir, "manifest.json")))
    notes = {s: read_table(storage.join(canonical_dir, f"notes_{s}.parquet"))
             for s in manifest["notes"]}
    for df in notes.values():
        df["topics"] = [list(t) if t is not None else [] for t in df["topics"]]
    pairs = {p: read_table(storage.join(canonical_dir, f"pairs_{p}.parquet"))
             for p in manifest["pairs"]}
    return notes, pairs, manifest


def derive_canonical(src: str, dst: str, *, notes: dict[str, pd.DataFrame] | None = None,
                     pairs: dict[str, pd.DataFrame] | None = None, note: dict | None = None
                     ) -> dict:
    """A canonical folder at ``dst`` made from the one at ``src``: ``notes``/``pairs`` replace
    whole tables (the given dicts become the complete set), every other file is copied as is.
    ``note`` is merged into the manifest (what the deriving step did). Returns the manifest."""
    manifest = json.loads(storage.read_text(storage.join(src, "manifest.json")))
    skip = {"manifest.json"}  # the old tables of a replaced kind, and the new ones
    for kind, tables in (("notes", notes), ("pairs", pairs)):
        if tables is None:
            continue
        skip |= {f"{kind}_{name}.parquet" for name in [*manifest[kind], *tables]}
        manifest[kind] = {}
        for name, df in tables.items():
            write_table(df, storage.join(dst, f"{kind}_{name}.parquet"))
            manifest[kind][name] = len(df)
    for name in storage.list_files(src):
        if name not in skip:
            storage.copy(storage.join(src, name), storage.join(dst, name))  # streamed
    manifest.update(note or {})
    storage.write_text(storage.join(dst, "manifest.json"), json.dumps(manifest, indent=2,
                                                                      default=str))
    return manifest


def evaluation_errors(notes: dict[str, pd.DataFrame], pairs: dict[str, pd.DataFrame]) -> list[str]:
    """What makes an honest evaluation impossible: no test notes (the candidate pool would be
    training notes), or a note in both the training (train, val) and the evaluated (test,
    test_<slice>) pairs — the check mined pairs get, applied to pairs the data brings."""
    errors = []
    if "test" not in notes:
        errors.append(f"no test notes (notes_test.csv or notes_test.parquet; the data has "
                      f"{', '.join('notes_' + s for s in notes) or 'none'}): evaluation would "
                      "rank among training notes")
    trained = [(k, pairs[k][c]) for k in ("train", "val") if k in pairs
               for c in ("query_id", "target_id")]
    for k, v in pairs.items():
        if not (k == "test" or k.startswith("test_")):
            continue
        for c in ("query_id", "target_id"):
            for name, ids in trained:
                hit = v[c].isin(ids).to_numpy()
                if not hit.any():
                    continue
                i = int(hit.argmax())
                place = where(v["_file"].iloc[i] if "_file" in v else f"pairs_{k}",
                              int(v["_row"].iloc[i]) if "_row" in v else i + 1, c)
                errors.append(f"{place}: note {v[c].iloc[i]!r} of the {k} pairs is also in the "
                              f"{name} pairs ({v[c][hit].nunique()} such note(s)); evaluated "
                              "notes must be unseen in training")
                return errors
    return errors
