"""Scored (prompt, option) pairs per second: unbatched vs padded batches vs batches sharing each prompt's
KV cache across its options (the default of `karma eval`), in one run on the same pairs.

    .venv/bin/python benchmarks/bench_eval.py                  # SmolLM2-135M, first 4 items of every task
    .venv/bin/python benchmarks/bench_eval.py --limit 8 --batch-size 32 --model PATH

The pairs are every option of the first `--limit` items of every multiple-choice task `karma eval` runs
(all suites), so prompts, options and lengths mix as in an evaluation. The batched modes score all of them;
unbatched scoring (no padding, so its rate does not depend on which pairs) scores a seeded random subset of
`--unbatched-pairs`. The script checks that the modes agree on the log-likelihoods and prints options/s
(wall clock and per CPU-second: the development machine is shared, so wall-clock figures move with its
load) and the speed-ups over unbatched scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--limit", type=int, default=4, help="items per task")
    ap.add_argument("--unbatched-pairs", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()

    import numpy as np
    import torch

    from karma.eval.scoring import CausalLM
    from karma.eval.tasks import load_tasks, requests

    pairs = requests(load_tasks("all", limit=args.limit))
    t = time.perf_counter()
    lm = CausalLM.load(args.model, device=args.device)
    load_s = time.perf_counter() - t
    n_tok = [len(c) + len(o) for c, o in (lm.encode_pair(*p) for p in pairs)]
    print(
        f"model {lm.name} on {lm.device} ({torch.get_num_threads()} threads), loaded in {load_s:.1f}s; "
        f"{len(pairs)} pairs ({len({c for c, _ in pairs})} prompts), tokens/pair mean {np.mean(n_tok):.0f} "
        f"max {max(n_tok)}; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    lm.loglikelihood(pairs[:4], batch_size=4, progress=False)  # warm-up
    subset = sorted(random.Random(0).sample(range(len(pairs)), min(args.unbatched_pairs, len(pairs))))
    modes = {
        f"padded pairs, batch {args.batch_size}": {"batch_size": args.batch_size, "share_prefix": False},
        f"shared prefix, batch {args.batch_size}": {"batch_size": args.batch_size, "share_prefix": True},
        "unbatched (1 pair/forward)": {"batch_size": 1, "share_prefix": False},
    }
    results, ref = {}, None
    for name, kw in modes.items():
        todo = [pairs[i] for i in subset] if kw["batch_size"] == 1 else pairs
        t, c = time.perf_counter(), time.process_time()
        ll = np.array([x[0] for x in lm.loglikelihood(todo, progress=False, **kw)])
        dt, dc = time.perf_counter() - t, time.process_time() - c
        ref = ll if ref is None else ref
        same = ref[subset] if len(todo) < len(pairs) else ref
        results[name] = {
            **kw,
            "pairs": len(todo),
            "seconds": dt,
            "cpu_seconds": dc,
            "options_per_s": len(todo) / dt,
            "options_per_cpu_s": len(todo) / dc,
            "max_rel_diff": float(np.abs(ll / same - 1).max()),
            "load_average": os.getloadavg()[0],
        }
        print(
            f"  {name}: {len(todo)} pairs, {dt:.1f}s wall, {dc:.1f}s CPU, load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    first = results["unbatched (1 pair/forward)"]
    print(
        f"{'mode':<28} {'pairs':>5} {'wall s':>7} {'opt/s':>7} {'CPU s':>7} {'opt/CPU-s':>9} "
        f"{'speed-up wall/CPU':>18} {'max rel Δll':>11}"
    )
    for name, r in results.items():
        print(
            f"{name:<28} {r['pairs']:>5} {r['seconds']:>7.1f} {r['options_per_s']:>7.2f} {r['cpu_seconds']:>7.1f} "
            f"{r['options_per_cpu_s']:>9.2f} {r['options_per_s'] / first['options_per_s']:>8.1f}x /"
            f"{r['options_per_cpu_s'] / first['options_per_cpu_s']:>6.1f}x {r['max_rel_diff']:>11.1e}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"model": lm.name, "device": str(lm.device), "n_pairs": len(pairs), "results": results},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
