"""Logging and progress output that read well both in a terminal and in a KFP/pod log."""

from __future__ import annotations

import logging
import os
import sys


def _quiet_progress_bars() -> None:
    """In a pod or under kfp.local the output is a pipe: let tqdm print a line now and then
    instead of redrawing one line with carriage returns. tqdm reads these when it is first
    imported, so this runs when this module is imported (steps import it first)."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", "10")
        # tqdm takes the env value as the bar charset, so spell out its ASCII one
        os.environ.setdefault("TQDM_ASCII", " 123456789#")


_quiet_progress_bars()


def setup(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, stream=sys.stdout, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("faiss.loader", "urllib3", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
