"""Embedding fan-out: notes/s of the tiny model on CPU with 1 and 2 shard processes.

Each shard is a fresh process running the embed step's ``run`` on its ``(shard_index,
num_shards)``, as the pipeline's ``ParallelFor`` tasks do; wall time is measured from the parent
(process start and model load included, as a task pays them). Prints rows shaped like
run_all.py's; nothing is asserted.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

_SHARD = """
import sys, torch
torch.set_num_threads(int(sys.argv[5]))
from components.common.config import resolve
from components.embed.run import run
run(sys.argv[1], sys.argv[2], sys.argv[3], resolve("tiny", []), probes=False, progress=False,
    shard_index=int(sys.argv[4]), num_shards=int(sys.argv[6]))
"""


def _prepare(root: str, notes: int) -> tuple[str, str]:
    from components.common.config import resolve
    from components.common.readers import read_dataset, write_canonical
    from model import build_model
    from pipelines.demo_data import make_demo_data

    make_demo_data(os.path.join(root, "raw"), notes=notes, seed=11)
    ds = read_dataset(os.path.join(root, "raw"))
    canon, model_dir = os.path.join(root, "canon"), os.path.join(root, "model")
    write_canonical(ds, canon)
    corpus = [t + " " + c for df in ds.notes.values() for t, c in zip(df["title"], df["content"],
                                                                       strict=True)]
    build_model(resolve("tiny", []).model, corpus=corpus, seed=0).save_pretrained(model_dir)
    return canon, model_dir


def _fan_out(canon: str, model_dir: str, out: str, shards: int, threads: int) -> float:
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", _SHARD, canon, model_dir,
                               os.path.join(out, f"s{i}"), str(i), str(threads), str(shards)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(shards)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(err.decode()[-2000:])
    return time.perf_counter() - t0


def bench_embed(repeat: int, notes: int = 1000) -> list[tuple]:
    with tempfile.TemporaryDirectory() as root:
        canon, model_dir = _prepare(root, notes)
        runs = {(1, 1): [], (1, 2): [], (2, 1): []}
        for r in range(repeat):
            for shards, threads in runs:
                runs[shards, threads].append(_fan_out(canon, model_dir, os.path.join(
                    root, f"out{r}-{shards}-{threads}"), shards, threads))
        t = {k: statistics.median(v) for k, v in runs.items()}
    rate = {k: notes / v for k, v in t.items()}
    return [(f"embed {notes} notes, 2 shard processes x 1 thread", f"{rate[2, 1]:,.0f} notes/s",
             f"{rate[1, 1]:,.0f} notes/s (1 process x 1 thread)",
             f"{rate[2, 1] / rate[1, 1]:.2f}x",
             f"1 process x 2 threads: {rate[1, 2]:,.0f} notes/s; wall time includes process "
             "start and model load")]


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    for row in bench_embed(1 if quick else 3, 300 if quick else 1000):
        print("  ".join(str(c) for c in row))
