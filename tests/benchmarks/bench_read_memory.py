"""Peak memory and time of ``read_dataset`` on a generated official-layout folder.

    python tests/benchmarks/bench_read_memory.py --notes 300000 --events 1000000

Writes ``notes_train.csv`` (headerless, the official five fields, inline topic tags, some
multi-line quoted content), ``note_pairs_train.csv`` and ``events.csv`` to a temporary folder,
then reads it with :func:`components.common.readers.read_dataset` in a fresh process per repeat.
Reported: file sizes, the reader's time and its peak RSS above the same process just before the
read (the interpreter with pandas, pyarrow and the readers imported). ``--root`` imports the
package from another checkout (e.g. an older version, for a before/after figure).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = ["cotton", "doll", "手工", "穿搭", "travel", "咖啡", "recipe", "分享", "sunset", "城市"]


def generate(folder: str, notes: int, events: int, seed: int = 0) -> dict[str, int]:
    """The official layout at ``notes`` notes, ``notes // 2`` pairs and ``events`` events."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    with open(os.path.join(folder, "notes_train.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        for i in range(notes):
            body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
            if i % 50 == 0:
                body += "\nsecond line, with a comma"
            w.writerow([f"n{i}", f"title {i} {rng.choice(WORDS)}",
                        f"{body} #Tag{i % 97}[话题]# end", f"img{i}", f"L{i % 13}@L{i % 7}@"])
    with open(os.path.join(folder, "note_pairs_train.csv"), "w", newline="") as f:
        w = csv.writer(f)
        for _ in range(notes // 2):
            w.writerow([f"n{rng.randrange(notes)}", f"n{rng.randrange(notes)}"])
    with open(os.path.join(folder, "events.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "note_id", "event", "ts"])
        for i in range(events):
            w.writerow([f"u{rng.randrange(notes // 4 + 1)}", f"n{rng.randrange(notes)}",
                        "click" if i % 5 == 0 else "view",
                        f"2024-05-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00Z"])
    return {n: os.path.getsize(os.path.join(folder, n)) for n in sorted(os.listdir(folder))
            if n.endswith(".csv")}


def child(folder: str) -> None:
    """One read in this process; prints JSON with seconds and peak RSS (KiB) before/after."""
    import resource
    import time

    from components.common.readers import read_dataset

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    ds = read_dataset(folder)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "base_kib": before, "peak_kib": peak,
                      "notes": sum(len(d) for d in ds.notes.values()),
                      "pairs": sum(len(d) for d in ds.pairs.values()),
                      "events": 0 if ds.events is None else len(ds.events)}))


def measure(folder: str, root: str, repeat: int) -> list[dict]:
    runs = []
    env = dict(os.environ, PYTHONPATH=root)
    for _ in range(repeat):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", folder],
                             env=env, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--notes", type=int, default=300_000)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--root", default=ROOT, help="checkout whose components/ is measured")
    ap.add_argument("--folder", default="", help="reuse (or create) this data folder")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp:
        folder = args.folder or tmp
        if not os.path.exists(os.path.join(folder, "notes_train.csv")):
            generate(folder, args.notes, args.events)
        sizes = {n: os.path.getsize(os.path.join(folder, n)) for n in sorted(os.listdir(folder))
                 if n.endswith(".csv")}
        runs = measure(folder, os.path.abspath(args.root), args.repeat)
    mib = 1024 * 1024
    total = sum(sizes.values())
    print(f"read_dataset on {runs[0]['notes']:,} notes, {runs[0]['pairs']:,} pairs, "
          f"{runs[0]['events']:,} events; files {total / mib:.1f} MiB ("
          + ", ".join(f"{n} {s / mib:.1f}" for n, s in sizes.items()) + ")")
    above = [(r["peak_kib"] - r["base_kib"]) / 1024 for r in runs]
    times = [r["seconds"] for r in runs]
    print(f"  time: median {statistics.median(times):.2f} s "
          f"({', '.join(f'{t:.2f}' for t in times)})")
    print(f"  peak RSS above the interpreter: median {statistics.median(above):.0f} MiB "
          f"({', '.join(f'{a:.0f}' for a in above)}); interpreter "
          f"{runs[0]['base_kib'] / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
