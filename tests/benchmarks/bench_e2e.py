"""`run-local` end to end at size: wall time and peak RSS of every pipeline step.

Generates N demo notes with their events (``make-demo-data``, in a child process), then runs
``run-local`` (tiny preset, default config unless ``--set`` says otherwise) as a child process
and samples its whole process tree with psutil. kfp.local runs every task as a subprocess
(``python -m kfp.dsl.executor_main ... --function_to_execute <step>``); each sampled process is
put in the group of the nearest task process among itself and its ancestors, so DeepSpeed workers
count with ``train`` and each embed shard is its own group (``embed[i]``). What is left — the
``run-local`` process itself, which reads the data once before any task (preflight) and copies the
results into the work folder after the last — is ``driver``.

Per group: wall time (first to last sample that saw it), the peak over samples of the
summed RSS of its processes, and the largest single-process high-water mark (``VmHWM``, exact even
between samples). Overall: the peak of the summed RSS of the whole tree, and ``os.wait4``'s
``ru_maxrss`` (the largest single process in the tree). RSS counts shared library pages in every
process that maps them, so a group's sum overstates what its processes take together.

    python tests/benchmarks/bench_e2e.py --notes 100000
    python tests/benchmarks/bench_e2e.py --notes 5000 --data /tmp/demo5k   # reuse/keep the data
    python tests/benchmarks/bench_e2e.py --notes 100000 --max-rss-gib 6    # exit 1 when over

Exit status 1 when run-local fails or the overall peak exceeds ``--max-rss-gib``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIB = 1 << 30
TASK = re.compile(r"--function_to_execute\s+(\w+)")
SHARD = re.compile(r'\\?"shard_index\\?":\s*(\d+)')
# pipeline order, for printing (promote runs only when the gate passes)
ORDER = ("driver", "settings", "ingest", "mine_pairs", "validate", "validate_gate", "train",
         "shard_plan", "embed", "merge_embeddings", "index", "evaluate", "register", "promote",
         "finish_run")


@dataclass
class Group:
    start: float = float("inf")
    end: float = 0.0
    peak_rss: int = 0  # peak over samples of the summed RSS of the group's processes
    max_hwm: int = 0  # largest single-process VmHWM seen
    pids: set[int] = field(default_factory=set)


def _hwm(pid: int) -> int:
    """The process's peak resident set so far (bytes), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeSampler(threading.Thread):
    """Samples the process tree under ``root`` every ``interval`` seconds until stopped."""

    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = psutil.Process(root), interval
        self.groups: dict[str, Group] = {}
        self.peak_total = 0
        self.samples = 0
        self._labels: dict[tuple[int, float], str] = {}  # (pid, create_time) -> own task label
        self._halt = threading.Event()

    def _own_label(self, proc: psutil.Process) -> str:
        """The task label from the process's own command line ('' when it is not a task)."""
        key = (proc.pid, proc.create_time())
        if key not in self._labels:
            try:
                cmd = " ".join(proc.cmdline())
            except psutil.Error:
                return ""
            m = TASK.search(cmd)
            label = m.group(1) if m else ""
            if label == "embed" and (s := SHARD.search(cmd)):
                label = f"embed[{s.group(1)}]"
            self._labels[key] = label
        return self._labels[key]

    def sample(self) -> None:
        now = time.time()
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        by_pid = {p.pid: p for p in procs}
        sums: dict[str, int] = {}
        total = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
                if not rss:  # a zombie: exited, not reaped yet
                    continue
                label, q = "", p
                while q is not None and not label:  # nearest task among itself and ancestors
                    label = self._own_label(q)
                    q = by_pid.get(q.ppid()) if q.pid != self.root.pid else None
                label = label or "driver"
                g = self.groups.setdefault(label, Group())
                # first and last sample that saw it (psutil's create_time is off by up to a
                # second: the boot time it counts from is whole seconds)
                g.pids.add(p.pid)
                g.start = min(g.start, now)
                g.end = now
                g.max_hwm = max(g.max_hwm, _hwm(p.pid))
            except psutil.Error:
                continue
            sums[label] = sums.get(label, 0) + rss
            total += rss
        for label, s in sums.items():
            self.groups[label].peak_rss = max(self.groups[label].peak_rss, s)
        self.peak_total = max(self.peak_total, total)
        self.samples += 1

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _run_child(cmd: list[str], log_path: str, interval: float = 0.0):
    """Run ``cmd`` (cwd: the repository); returns (exit status, seconds, ru_maxrss bytes,
    sampler or None)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = None
        if interval:
            sampler = TreeSampler(proc.pid, interval)
            sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if sampler:
            sampler.stop()
    return proc.returncode, seconds, usage.ru_maxrss * 1024, sampler


def _tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _union(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the sorted (start, end) spans."""
    total, reach = 0.0, float("-inf")
    for start, end in spans:
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _order(label: str) -> tuple[int, int]:
    base, _, shard = label.partition("[")
    return (ORDER.index(base) if base in ORDER else len(ORDER), int(shard.rstrip("]") or 0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--notes", type=int, default=100_000)
    ap.add_argument("--data", help="demo data folder: generated here when it has no "
                    "notes_train.csv, kept afterwards (default: a temporary folder)")
    ap.add_argument("--work", help="run-local work folder (default: a temporary folder)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="config override passed to run-local")
    ap.add_argument("--interval", type=float, default=0.2, help="sampling period, seconds")
    ap.add_argument("--max-rss-gib", type=float, default=0.0,
                    help="exit 1 when the overall peak (summed RSS) is above this")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="bench_e2e_")
    data = os.path.abspath(args.data or os.path.join(tmp.name, "data"))
    work = os.path.abspath(args.work or os.path.join(tmp.name, "work"))
    py = sys.executable
    result: dict = {"notes": args.notes, "overrides": args.overrides, "cpus": os.cpu_count()}

    if os.path.exists(os.path.join(data, "notes_train.csv")):
        print(f"data: reusing {data}")
    else:
        rc, sec, maxrss, _ = _run_child(
            [py, "-m", "pipelines.cli", "make-demo-data", "--out", data, "--notes",
             str(args.notes)], os.path.join(tmp.name, "make-demo-data.log"))
        if rc:
            print(_tail(os.path.join(tmp.name, "make-demo-data.log")), file=sys.stderr)
            return 1
        result["make_demo_data"] = {"seconds": sec, "peak_rss": maxrss}
        print(f"make-demo-data --notes {args.notes}: {sec:.1f} s, peak RSS {_gib(maxrss)}")
    with open(os.path.join(data, "events.csv")) as f:
        result["events"] = sum(1 for _ in f) - 1

    log_path = os.path.join(os.path.dirname(work), os.path.basename(work) + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    cmd = [py, "-m", "pipelines.cli", "run-local", "--data", data, "--work", work,
           "--preset", "tiny", *(x for o in args.overrides for x in ("--set", o))]
    rc, sec, maxrss, sampler = _run_child(cmd, log_path, args.interval)
    if rc:
        print(_tail(log_path), file=sys.stderr)
        print(f"run-local failed (exit {rc}); log: {log_path}", file=sys.stderr)
        return 1
    steps = {label: {"seconds": g.end - g.start, "peak_rss": g.peak_rss, "max_hwm": g.max_hwm,
                     "processes": len(g.pids)}
             for label, g in sorted(sampler.groups.items(), key=lambda kv: _order(kv[0]))}
    if "driver" in steps:  # the driver lives throughout: its time is the time outside tasks
        tasks = sorted((g.start, g.end) for k, g in sampler.groups.items() if k != "driver")
        steps["driver"]["seconds"] = sec - _union(tasks)
    result.update(run_local_seconds=sec, peak_rss_tree=sampler.peak_total,
                  max_process_rss=maxrss, samples=sampler.samples, steps=steps)

    print(f"\nrun-local, {args.notes} notes, {result['events']} events, tiny preset"
          f"{' ' + ' '.join(args.overrides) if args.overrides else ''}, {os.cpu_count()} CPUs")
    print(f"{'step':<18}{'wall s':>9}{'peak RSS (sum)':>16}{'max process':>14}{'procs':>7}")
    for label, s in steps.items():
        print(f"{label:<18}{s['seconds']:>9.1f}{_gib(s['peak_rss']):>16}"
              f"{_gib(s['max_hwm']):>14}{s['processes']:>7}")
    embeds = [s for k, s in steps.items() if k.startswith("embed[")]
    if len(embeds) > 1:
        print(f"{'embed (all shards)':<18}{sum(s['seconds'] for s in embeds):>9.1f}"
              f"{_gib(max(s['peak_rss'] for s in embeds)):>16}")
    print(f"{'total':<18}{sec:>9.1f}{_gib(sampler.peak_total):>16}{_gib(maxrss):>14}")
    print(f"({sampler.samples} samples every {args.interval} s; driver: the run-local "
          "process outside the tasks (preflight, kfp.local between tasks, publishing))")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.max_rss_gib and sampler.peak_total > args.max_rss_gib * GIB:
        print(f"overall peak {_gib(sampler.peak_total)} is above {args.max_rss_gib} GiB",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
