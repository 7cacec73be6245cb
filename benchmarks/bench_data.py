"""Speed and memory of `karma data prepare` on the college dumps, against the decompress + json floor.

    python benchmarks/bench_data.py                     # 1x and 10x input, workers = CPU cores
    python benchmarks/bench_data.py --scales 1 --workers 1

Measured in one run:
* floor  — zstd decompress + `json.loads` of every line of RC_college.zst and RS_college.zst, one process
           (what any reader of these files must pay);
* prepare — `karma.data.prepare` end to end (decode, DuckDB, both parquet files, card) in a subprocess,
           with the peak RSS of its whole process tree (parse workers included) sampled every 20 ms, and
           the CPU seconds of that tree.
The ratio is floor time / prepare time (prepare's own `elapsed_seconds`, imports excluded); the CPU ratio
compares CPU seconds, which stays meaningful when other jobs share the machine.
The 10x input repeats both dumps ten times (concatenated zstd frames, so ids repeat: the decode stage reads
10x the lines, the relational stage deduplicates them) to show that memory does not grow with the input.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from karma.paths import shared_data_dir

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = shared_data_dir()


def floor(paths: list[Path]) -> tuple[float, int]:
    """Seconds to decompress and json-parse every line of the files, and the line count."""
    import zstandard

    t0 = time.perf_counter()
    n = 0
    loads = json.loads
    for path in paths:
        with open(path, "rb") as fh:
            reader = io.BufferedReader(zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(fh))
            for line in reader:
                loads(line)
                n += 1
    return time.perf_counter() - t0, n


def sample_tree(proc, cpu: dict[int, float]) -> int:
    """RSS of the process tree now; records each process's latest CPU seconds in `cpu` (pid -> s)."""
    import psutil

    try:
        p = psutil.Process(proc.pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            with q.oneshot():
                total += q.memory_info().rss
                t = q.cpu_times()
                cpu[q.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_prepare(rc: list[Path], rs: list[Path], out: Path, workers: int, memory_limit: str) -> dict:
    code = (
        "import json, sys; from karma.data import prepare; "
        f"card = prepare(comments={[str(p) for p in rc]!r}, submissions={[str(p) for p in rs]!r}, "
        f"out={str(out)!r}, workers={workers}, memory_limit={memory_limit!r}); "
        "print(json.dumps({'elapsed': card['elapsed_seconds'], 'timings': card['timings'], "
        "'examples': card['examples'], 'pairs': card['pairs']['total'], 'lines': card['lines_read']}))"
    )
    peak = 0
    cpu: dict[int, float] = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, sample_tree(proc, cpu))
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed with exit code {proc.returncode}")
    res = json.loads(stdout.strip().splitlines()[-1])
    res.update(wall=wall, peak_rss_mib=peak / 2**20, cpu_s=sum(cpu.values()))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--memory-limit", default="auto", help="DuckDB memory limit for the runs (auto: half the RAM)"
    )
    args = ap.parse_args()
    base = args.data / "reddit" / "college_2011_2022"
    rc, rs = base / "RC_college.zst", base / "RS_college.zst"
    if not rc.exists():
        raise SystemExit(f"college dumps not found in {base} (set --data or KARMA_SHARED_DATA)")

    c0 = time.process_time()
    t_floor, n_lines = floor([rc, rs])
    cpu_floor = time.process_time() - c0
    n_comments = 428_518
    print(f"floor (decompress + json.loads, 1 process): {t_floor:.2f} s for {n_lines:,} lines "
          f"= {n_comments / t_floor:,.0f} comments/s")  # fmt: skip
    print(f"   (CPU time {cpu_floor:.2f} s; load average before the runs: {os.getloadavg()[0]:.1f})")
    results = {"floor_s": round(t_floor, 3), "floor_cpu_s": round(cpu_floor, 3), "workers": args.workers,
               "cpus": os.cpu_count(), "runs": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        for k in args.scales:
            if k == 1:
                rcs, rss = [rc], [rs]
            else:  # k copies as concatenated zstd frames
                rcs, rss = [tmp / f"RC_x{k}.zst"], [tmp / f"RS_x{k}.zst"]
                rcs[0].write_bytes(rc.read_bytes() * k)
                rss[0].write_bytes(rs.read_bytes() * k)
            r = run_prepare(rcs, rss, tmp / f"out{k}", args.workers, args.memory_limit)
            rate = n_comments * k / r["elapsed"]
            ratio = t_floor * k / r["elapsed"]
            cpu_ratio = cpu_floor * k / r["cpu_s"]
            results["runs"][f"x{k}"] = {**r, "comments_per_s": round(rate), "ratio_to_floor": round(ratio, 3),
                                        "cpu_ratio_to_floor": round(cpu_ratio, 3)}  # fmt: skip
            print(f"x{k}: prepare {r['elapsed']:.2f} s (wall {r['wall']:.2f} s incl. start-up) = {rate:,.0f} comments/s, "
                  f"ratio to floor {ratio:.2f}; CPU {r['cpu_s']:.1f} s (floor/prepare CPU {cpu_ratio:.2f}); "
                  f"peak RSS {r['peak_rss_mib']:,.0f} MiB; {r['examples']:,} examples, {r['pairs']:,} pairs; "
                  f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
            print("    phases: " + ", ".join(f"{k2} {v:.2f}" for k2, v in r["timings"].items()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
