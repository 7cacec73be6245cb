"""Wall time and peak memory of a whole process tree: the figure the README's demo claims are measured with.

    .venv/bin/python benchmarks/measure_run.py --out runs/demo-measure.json -- \
        .venv/bin/karma demo --data ../shared/data/reddit/college_2011_2022 --out runs/demo

Every `--interval` seconds it sums the resident set size (RSS) of the command and all its descendants (the
reward service, vLLM workers, compile workers, eval processes) and keeps the peak of that sum, the peak of any
one process, and a timeline. The RSS sum counts pages shared between processes (the torch libraries mapped
by each) once per process: it is an upper bound of the tree's memory, i.e. what `/usr/bin/time -v` cannot
show (its "Maximum resident set size" is that of the largest single process). Beside it, the tree's
proportional set size (PSS: a page shared by k processes counts 1/k in each, so the sum is the tree's
physical memory; read from /proc/PID/smaps_rollup) is sampled every `--pss-every` samples. The load average
before and after is printed so a reader can tell an idle run from a loaded one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    """The process and its descendants (empty once it has exited)."""
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_pss(procs: list[psutil.Process]) -> int:
    """Sum of PSS over `procs` (0 for one where the kernel does not report it)."""
    total = 0
    for p in procs:
        try:
            total += getattr(p.memory_full_info(), "pss", 0)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def tree_rss(procs: list[psutil.Process]) -> tuple[int, int, int]:
    """(sum of RSS over `procs`, largest single RSS, number of processes)."""
    total, largest, n = 0, 0, 0
    for p in procs:
        try:
            rss = p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total, largest, n = total + rss, max(largest, rss), n + 1
    return total, largest, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    ap.add_argument("--pss-every", type=int, default=2, help="sample the tree's PSS every N samples")
    ap.add_argument("--out", type=Path, help="write the figures and the timeline here (JSON)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the command after --")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd)
    proc = psutil.Process(child.pid)
    peak_total, peak_single, peak_pss, timeline, samples = 0, 0, 0, [], 0
    while child.poll() is None:
        procs = _tree(proc)  # one walk of the tree per sample
        total, largest, n = tree_rss(procs)
        peak_total, peak_single = max(peak_total, total), max(peak_single, largest)
        if samples % args.pss_every == 0:
            peak_pss = max(peak_pss, tree_pss(procs))
        samples += 1
        timeline.append((round(time.perf_counter() - t0, 1), round(total / 2**20), n))
        time.sleep(args.interval)
    wall = time.perf_counter() - t0
    result = {
        "cmd": cmd,
        "returncode": child.returncode,
        "wall_s": round(wall, 1),
        "peak_tree_rss_mib": round(peak_total / 2**20),
        "peak_single_rss_mib": round(peak_single / 2**20),
        "peak_tree_pss_mib": round(peak_pss / 2**20),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "cores": len(os.sched_getaffinity(0)),
    }
    print(json.dumps(result), file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result | {"timeline_s_mib_procs": timeline}, indent=1))
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
