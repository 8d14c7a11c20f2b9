"""Load the canonical folder that ``ingest`` wrote."""

from __future__ import annotations

import json

import pandas as pd

from components.common import storage
from components.common.readers import read_table


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
