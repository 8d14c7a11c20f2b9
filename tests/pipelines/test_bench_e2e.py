"""The end-to-end benchmark's process-tree sampler: processes are grouped by the task they
belong to (a task's own children count with it), and a group's peak includes its children."""

import os
import subprocess
import sys
import textwrap
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

from bench_e2e import TreeSampler, _union  # noqa: E402

MIB = 1 << 20

# A stand-in for kfp.local: the root starts two "tasks" one after the other, as kfp.local
# does; the first ("train") starts a worker child that holds 200 MiB while the task holds 50.
DRIVER = textwrap.dedent("""
    import subprocess, sys
    TASK = '''
    import subprocess, sys, time
    buf = bytearray({own} * 2**20)
    worker = subprocess.Popen([sys.executable, "-c",
        "import time; b = bytearray({child} * 2**20); time.sleep(1.2)"]) if {child} else None
    time.sleep(1.2)
    if worker: worker.wait()
    '''
    for name, own, child in (("train", 50, 200), ("index", 20, 0)):
        subprocess.run([sys.executable, "-c", TASK.format(own=own, child=child),
                        "--function_to_execute", name], check=True)
""")


def test_sampler_groups_processes_by_task_and_counts_children():
    proc = subprocess.Popen([sys.executable, "-c", DRIVER])
    sampler = TreeSampler(proc.pid, 0.05)
    sampler.start()
    proc.wait()
    time.sleep(0.1)
    sampler.stop()
    assert proc.returncode == 0
    g = sampler.groups
    assert set(g) == {"driver", "train", "index"}
    assert len(g["train"].pids) == 2 and len(g["index"].pids) == 1  # the worker counts as train
    # train's peak sums the task (>= 50 MiB) and its worker (>= 200 MiB); index holds 20 MiB
    assert g["train"].peak_rss > 250 * MIB
    assert g["train"].max_hwm > 200 * MIB  # the worker, the largest single process
    assert 20 * MIB < g["index"].peak_rss < 200 * MIB
    assert g["train"].end <= g["index"].start + 0.1  # one after the other
    assert 1.0 < g["train"].end - g["train"].start < 5
    assert sampler.peak_total >= g["train"].peak_rss


def test_union_counts_overlaps_once():
    assert _union([(0, 2), (1, 3), (5, 6)]) == 4
    assert _union([]) == 0
