"""Training speed of the tiny preset on CPU, one thread per process, in fresh processes.

  2 processes (torchrun, gloo, ZeRO-2)      vs  1 process (the engine in the caller's process)
  1 process: the DeepSpeed engine (ours)    vs  a plain torch AdamW loop on the same batches

pairs/s is measured over the second half of the steps (the first half warms caches up); peak
RSS is per process (the largest rank's). Prints a table; nothing is asserted.
``bench_train(repeat)`` returns rows shaped like run_all.py's (name, ours, baseline, ratio, note).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

NOTES = 400  # demo notes: ~100 training pairs, enough for 2 x 32 pairs a step


def _data(work: str) -> str:
    from components.common.readers import read_dataset, write_canonical
    from pipelines.demo_data import make_demo_data

    canon = os.path.join(work, "canon")
    if not os.path.isdir(canon):
        make_demo_data(os.path.join(work, "data"), notes=NOTES, seed=3)
        write_canonical(read_dataset(os.path.join(work, "data")), canon)
    return canon


def _config(steps: int, nproc: int):
    from components.common.config import resolve

    return resolve("tiny", [f"train.max_steps={steps}", f"train.log_every={steps // 2}",
                            f"train.val_every={10 * steps}", "train.checkpoint_every=0",
                            f"train.nproc={nproc}", "train.threads_per_proc=1"])


def _run_worker(work: str, steps: int, nproc: int, tag: str) -> dict:
    """Our run(): a fresh process each, so the one-process figures are that process's own."""
    import torch

    torch.set_num_threads(1)
    from components.common.tracking import create_run
    from components.train.run import run

    canon = _data(work)
    out = os.path.join(work, tag)
    uri = f"sqlite:///{out}.db"
    t0 = time.perf_counter()
    final = run(canon, os.path.join(out, "model"), _config(steps, nproc), tracking_uri=uri,
                run_id=create_run(uri, "bench", tag, {}), progress=False)
    return {"pairs_per_s": final["pairs_per_s"], "peak_rss_mib": final["peak_rss_mib"],
            "wall_s": time.perf_counter() - t0}


def _plain_worker(work: str, steps: int) -> dict:
    """The baseline: the same model, batches, AdamW, schedule and clipping, no engine."""
    import resource

    import torch

    torch.set_num_threads(1)
    from components.common.notes import LazyNotes
    from components.train.data import PairBatches, PairOrder, PixelCache, TrainData, make_collate
    from components.train.worker import lr_lambda, param_groups
    from model import build_model
    from model.collator import NoteCollator
    from model.loss import notellm2_loss

    cfg = _config(steps, 1)
    t = cfg.train
    data = TrainData.load(_data(work))
    model = build_model(cfg.model, corpus=data.corpus(), seed=t.seed).train()
    lazy, collator = LazyNotes(data.notes), NoteCollator(model)
    collate = make_collate(lazy, collator, PixelCache(lazy, collator, 2**30))
    order = PairOrder(len(data.train), min(t.batch_pairs, len(data.train)), seed=t.seed)
    loader = torch.utils.data.DataLoader(PairBatches(data.train, data.row_of),
                                         batch_sampler=order, collate_fn=collate)
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=t.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, int(t.warmup_ratio * steps)))
    step, epoch, timed, pairs = 0, 0, 0.0, 0
    while step < steps:
        order.set_epoch(epoch)
        t0 = time.perf_counter()
        for batch in loader:
            keys = batch.pop("keys")
            loss = notellm2_loss(model(**batch), model.log_scale, 9.0, 1.0, keys=keys)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            sched.step()
            step += 1
            if step > steps // 2:
                timed += time.perf_counter() - t0
                pairs += len(keys) // 2
            if step >= steps:
                break
            t0 = time.perf_counter()
        epoch += 1
    return {"pairs_per_s": pairs / timed,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _fresh(fn, *args) -> dict:
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def bench_train(repeat: int, steps: int = 40) -> list[tuple]:
    results: dict[str, list[dict]] = {"two": [], "one": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as work:
        _fresh(_data, work)
        for i in range(repeat):  # interleaved, so a busy moment hits every mode alike
            results["one"].append(_fresh(_run_worker, work, steps, 1, f"one{i}"))
            results["two"].append(_fresh(_run_worker, work, steps, 2, f"two{i}"))
            results["plain"].append(_fresh(_plain_worker, work, steps))

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    two, one, plain = (med(m, "pairs_per_s") for m in ("two", "one", "plain"))
    return [
        (f"train tiny, {steps} steps, 2 procs x 1 thread (32 pairs each) vs 1 proc x 1 thread",
         f"{two:,.0f} pairs/s", f"{one:,.0f} pairs/s (1 process)", f"{two / one:.2f}x",
         f"peak RSS/process {med('two', 'peak_rss_mib'):.0f} vs {med('one', 'peak_rss_mib'):.0f}"
         f" MiB; run() wall {med('two', 'wall_s'):.1f} vs {med('one', 'wall_s'):.1f} s"),
        (f"train tiny, {steps} steps, 1 proc x 1 thread: DeepSpeed engine vs plain loop",
         f"{one:,.0f} pairs/s", f"{plain:,.0f} pairs/s (torch AdamW loop)", f"{one / plain:.2f}x",
         f"peak RSS {med('one', 'peak_rss_mib'):.0f} vs {med('plain', 'peak_rss_mib'):.0f} MiB"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps, one repeat")
    args = ap.parse_args()
    repeat = 1 if args.quick else 3
    rows = bench_train(repeat, steps=20 if args.quick else 40)
    from table import print_table

    print_table(rows, repeat)


if __name__ == "__main__":
    main()
