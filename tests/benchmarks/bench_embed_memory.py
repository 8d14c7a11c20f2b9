"""Peak memory of the embed step: the tiny model over N generated notes (with photos), probes on.

The step runs in a fresh process (as a pipeline task does); its peak RSS is read from the
parent (``getrusage(RUSAGE_CHILDREN)``) along with the wall time. ``--root DIR`` keeps the
generated data and model in DIR, so runs before and after a change read the same files.

    python tests/benchmarks/bench_embed_memory.py --notes 20000 --root /tmp/embed20k
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

_STEP = """
import sys, torch
torch.set_num_threads(2)
from components.common.config import resolve
from components.embed.run import run
run(sys.argv[1], sys.argv[2], sys.argv[3], resolve("tiny", []), progress=False)
"""


def _prepare(root: str, notes: int) -> tuple[str, str]:
    canon, model_dir = os.path.join(root, "canon"), os.path.join(root, "model")
    if os.path.exists(os.path.join(model_dir, "config.json")):
        return canon, model_dir
    from tests.benchmarks.bench_embed import _prepare as prepare

    return prepare(root, notes)


def bench_embed_memory(notes: int, root: str) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in MiB) of one embed step over ``notes`` notes."""
    canon, model_dir = _prepare(root, notes)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", _STEP, canon, model_dir, out], cwd=ROOT, check=True)
        seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--notes", type=int, default=20000)
    ap.add_argument("--root", default="")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or tmp
        os.makedirs(root, exist_ok=True)
        seconds, cpu, peak = bench_embed_memory(args.notes, root)
    print(f"embed {args.notes} notes (tiny model, probes on): {seconds:.1f} s wall, "
          f"{cpu:.1f} s CPU, peak RSS {peak:,.0f} MiB")
