"""Host memory of ZeRO-3 vs ZeRO-2 training: peak RSS per rank at 2 (and 4) CPU processes, a
~100M-parameter model loaded from a checkpoint folder (Llama architecture, random weights, stored
in bf16 as published LLMs are; written locally, nothing downloaded).

ZeRO-2 builds the whole model in every process and partitions gradients and optimizer state;
ZeRO-3 builds it partitioned (``deepspeed.zero.Init``; rank 0 alone reads the checkpoint), so each
process holds 1/N of the parameters too, from the start. Each configuration runs the train step's
own ``run()`` in a fresh process and reports the largest rank's peak RSS (``ru_maxrss`` of the
training processes), over the whole run (validation, checkpoint and export included) and over
building the model alone. Per parameter, fp32 training holds weights (4 B), gradients (4 B), a
master copy (4 B) and Adam's moments (8 B): ZeRO-2 keeps 4 + 16/N bytes a rank, ZeRO-3 20/N,
so at N = 2 the model state shrinks to 0.83x at best (0.63x at N = 4) and the process's fixed
part (Python, torch, transformers, DeepSpeed: ~0.45 GiB) does not shrink at all. Prints a table;
nothing is asserted. ``bench_zero3(repeat, worlds)`` returns rows shaped like run_all.py's.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# a Llama-architecture decoder of 127M parameters (GPT-2-small-like widths, 32k vocabulary)
SHAPE = {"hidden": 768, "layers": 12}


def _checkpoint(work: str) -> str:
    import torch

    from tests import checkpoints as ck

    path = os.path.join(work, "llama-110m-bf16")
    if not os.path.isdir(path):
        ck.llama_checkpoint(path, dtype=torch.bfloat16, vocab_size=32_000,
                            hidden=SHAPE["hidden"], layers=SHAPE["layers"],
                            intermediate=2048)
    return path


def _canonical(work: str) -> str:
    from components.common.readers import read_dataset, write_canonical
    from pipelines.demo_data import make_demo_data

    canon = os.path.join(work, "canon")
    if not os.path.isdir(canon):
        make_demo_data(os.path.join(work, "data"), notes=200, seed=3)
        write_canonical(read_dataset(os.path.join(work, "data")), canon)
    return canon


def _run_worker(work: str, stage: int, nproc: int, tag: str) -> dict:
    from components.common.config import resolve
    from components.common.tracking import create_run
    from components.train.run import run

    cfg = resolve("tiny", [f"model.llm={_checkpoint(work)}", "model.variant=text_only",
                           "train.max_steps=3", "train.batch_pairs=4", "train.log_every=1",
                           "train.val_every=100", "train.checkpoint_every=0",
                           f"train.nproc={nproc}", "train.threads_per_proc=1",
                           f"train.zero_stage={stage}", "train.lr=1e-5"])
    out = os.path.join(work, tag)
    uri = f"sqlite:///{out}.db"
    final = run(_canonical(work), os.path.join(out, "model"), cfg, tracking_uri=uri,
                run_id=create_run(uri, "bench", tag, {}), progress=False)
    return {k: final[k] for k in ("peak_rss_mib", "build_peak_rss_mib", "pairs_per_s")}


def _fresh(fn, *args) -> dict:
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def bench_zero3(repeat: int = 1, worlds: tuple[int, ...] = (2, 4)) -> list[tuple]:
    with tempfile.TemporaryDirectory(prefix="notellm2-bench-zero3-") as work:
        _fresh(_checkpoint, work)
        _fresh(_canonical, work)
        params = _fresh(_count, work)
        runs = {(w, s): [_fresh(_run_worker, work, s, w, f"w{w}-z{s}-{i}")
                         for i in range(repeat)]
                for w in worlds for s in (2, 3)}

    def med(world: int, stage: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[(world, stage)])

    model = f"{params / 1e6:.0f}M-param Llama (bf16 checkpoint), fp32 training"
    rows = []
    for w in worlds:
        # the floor set by ZeRO's memory model, fp32 weights (4 B), gradients (4 B), master
        # copy (4 B) and Adam (8 B) per parameter: ZeRO-2 partitions all but the weights
        floor = (20 / w) / (4 + 16 / w)
        for key, what in (("peak_rss_mib", "whole run"), ("build_peak_rss_mib", "model build")):
            z2, z3 = med(w, 2, key), med(w, 3, key)
            note = (f"model state alone: {floor:.2f}x by ZeRO's arithmetic; target <= 0.6x"
                    if key == "peak_rss_mib" else "from the checkpoint, before the engine")
            rows.append((f"{model}, {w} CPU processes: peak RSS per rank ({what}), ZeRO-3 vs "
                         "ZeRO-2", f"{z3:,.0f} MiB", f"{z2:,.0f} MiB", f"{z3 / z2:.2f}x", note))
        rows.append((f"{model}, {w} CPU processes: pairs/s, ZeRO-3 vs ZeRO-2",
                     f"{med(w, 3, 'pairs_per_s'):.2f}", f"{med(w, 2, 'pairs_per_s'):.2f}",
                     f"{med(w, 3, 'pairs_per_s') / med(w, 2, 'pairs_per_s'):.2f}x",
                     "one thread per process"))
    return rows


def _count(work: str) -> int:
    import math

    from safetensors import safe_open

    with safe_open(os.path.join(_checkpoint(work), "model.safetensors"), "pt") as f:
        names = f.keys()  # a safetensors handle is not iterable
        return sum(math.prod(f.get_slice(k).get_shape()) for k in names)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args()
    from table import print_table

    print_table(bench_zero3(args.repeat, tuple(args.worlds)), args.repeat)


if __name__ == "__main__":
    main()
