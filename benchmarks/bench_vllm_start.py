"""vLLM CPU start-up: the engine's default (`VLLM_USE_AOT_COMPILE=0`) versus vLLM's own AOT-compile default.

Each start is a fresh process that creates the trainer's `VLLMEngine` on SmolLM2-135M and generates 8 × 32
tokens (so a broken engine cannot look fast). The first start of each setting may compile (cold); the rest
show the warm cost a `karma experiment` pays once per PPO run.

    .venv/bin/python benchmarks/bench_vllm_start.py [--starts 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import time
t0 = time.perf_counter()
from karma.models import smollm2_path
from services.policy_trainer.engines import VLLMEngine
e = VLLMEngine(str(smollm2_path()), dtype="float32", max_model_len=224, seed=0, eos_ids={2})
start = time.perf_counter() - t0
gens = e.generate([[1, 504, 3458, 314]] * 8, seed=0, max_new_tokens=32, temperature=1.0)
assert len(gens) == 8 and all(g.response_ids for g in gens)
print("START_S", round(start, 2))
"""


def one_start(aot: str) -> float:
    env = {**os.environ, "VLLM_USE_AOT_COMPILE": aot, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True, check=False
    )
    for line in out.stdout.splitlines():
        if line.startswith("START_S"):
            return float(line.split()[1])
    raise RuntimeError(f"vLLM start failed (VLLM_USE_AOT_COMPILE={aot}):\n{out.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=2, help="starts per setting (the first may compile)")
    args = ap.parse_args()
    times: dict[str, list[float]] = {}
    for label, aot in (("vLLM default (AOT compile)", "1"), ("karma default (VLLM_USE_AOT_COMPILE=0)", "0")):
        times[label] = [one_start(aot) for _ in range(args.starts)]
        print(f"{label}: starts {times[label]} s", flush=True)
    (aot_times, ours) = times.values()
    print(
        f"warm start, karma ÷ vLLM default: {ours[-1] / aot_times[-1]:.2f} "
        f"({ours[-1]:.1f} s vs {aot_times[-1]:.1f} s)"
    )


if __name__ == "__main__":
    main()
