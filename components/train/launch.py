"""Start the training processes: torchrun for several, the caller's own process for one.

``nproc`` processes on this node (``train.nproc``; 0 = one per visible GPU, or 1 on CPU), each
with ``train.threads_per_proc`` torch threads on CPU (0 = the cores shared out evenly). torchrun's
output is streamed through as it comes; when a rank fails, the error it left behind is raised
here (the earliest one, which is the cause rather than a peer's broken connection).
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile

import torch

from components.common.config import TrainConfig
from components.train import worker
from components.train.worker import (
    CheckpointMismatch,
    CheckpointUnreadable,
    Job,
    NonFiniteGradient,
    NonFiniteLoss,
)

log = logging.getLogger(__name__)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# errors a worker raises that keep their type when they cross the process boundary
KNOWN_ERRORS = {e.__name__: e for e in (NonFiniteLoss, NonFiniteGradient, CheckpointMismatch,
                                         CheckpointUnreadable, ValueError)}


class WorkerFailed(RuntimeError):
    """A training process failed; the message holds its error."""


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_nproc(t: TrainConfig) -> int:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if t.nproc == 0:
        return max(1, gpus)
    if gpus and t.nproc > gpus:
        raise ValueError(f"train.nproc={t.nproc} but {gpus} GPU(s) are visible: one process "
                         "per GPU (train.nproc=0 takes them all)")
    return t.nproc


def threads_per_proc(t: TrainConfig, nproc: int) -> int:
    return t.threads_per_proc if t.threads_per_proc > 0 else max(1, cores() // nproc)


def in_process(job: Job) -> dict[str, float]:
    """One process: the same engine in the caller's process (no torchrun start-up)."""
    threads = torch.get_num_threads()
    try:
        with worker.single_process_env():
            return worker.train(job)
    finally:
        torch.set_num_threads(threads)


def torchrun(job: Job, nproc: int, threads: int, *, out=None) -> dict[str, float]:
    """``nproc`` worker processes under torchrun; returns rank 0's final metrics."""
    out = out or sys.stdout
    with tempfile.TemporaryDirectory(prefix="notellm2-train-") as tmp:
        job = dataclasses.replace(job, result_dir=tmp, threads=threads)
        job_path = os.path.join(tmp, "job.json")
        job.save(job_path)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "--max-restarts=0",
               "-m", "components.train.worker", job_path]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH"))
                                              if p))
        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
        log.info("starting %d training processes: %s", nproc, " ".join(cmd))
        tail: collections.deque[str] = collections.deque(maxlen=60)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT)
        try:
            _stream(proc, out, tail)
            rc = proc.wait()
        except BaseException:
            proc.terminate()  # torchrun passes it on to the workers
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        if rc != 0:
            raise _failure(tmp, rc, nproc, tail)
        with open(os.path.join(tmp, "result.json")) as f:
            return json.load(f)


def _stream(proc: subprocess.Popen, out, tail: collections.deque) -> None:
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace")
    line = ""
    for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
        text = decode.decode(chunk)
        out.write(text)
        out.flush()
        line += text
        *done, line = line.split("\n")
        tail.extend(done)
    if line:
        tail.append(line)


def _failure(result_dir: str, rc: int, nproc: int, tail: collections.deque) -> Exception:
    errors = []
    for name in os.listdir(result_dir):
        if name.startswith("error-rank-"):
            with open(os.path.join(result_dir, name)) as f:
                errors.append(json.load(f))
    if not errors:
        return WorkerFailed(f"training processes exited with code {rc} and left no error "
                            "(killed? out of memory?); last output:\n" + "\n".join(tail))
    first = min(errors, key=lambda e: e["time"])
    head = f"rank {first['rank']} ({len(errors)} of {nproc} processes failed)"
    cls = KNOWN_ERRORS.get(first["type"])
    if cls is not None:
        return cls(f"{head}: {first['message']}")
    return WorkerFailed(f"training failed on {head}: {first['type']}: {first['message']}\n"
                        + first["traceback"])
