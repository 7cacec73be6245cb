"""Resident memory of the PPO process, part by part: the table in benchmarks/README.md ("The demo").

    .venv/bin/python benchmarks/probe_ppo_memory.py                      # glibc defaults, no checkpointing
    .venv/bin/python benchmarks/probe_ppo_memory.py --gradient-checkpointing
    MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=262144 \\
        .venv/bin/python benchmarks/probe_ppo_memory.py --gradient-checkpointing   # the experiment's STAGE_ENV

Loads what the demo's PPO process loads, in its order -- torch, transformers + peft, the SmolLM2 LoRA policy
(fp32, value head), an eager in-process vLLM engine (`--no-vllm` skips it) -- then runs 3 rounds of the
trainer's two forwards (policy + reference, no grad) and one forward + backward + AdamW step of a micro-batch
(4 x 128 tokens, 32 of them the response), printing the process's RSS and its peak (sampled every 50 ms)
after each part. The malloc settings must be in the environment when Python starts (glibc reads them once).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROC = psutil.Process()
PEAK = [0]


def _sample() -> None:
    while True:
        PEAK[0] = max(PEAK[0], PROC.memory_info().rss)
        time.sleep(0.05)


def mark(what: str) -> None:
    time.sleep(0.2)  # let the sampler see the part's peak
    rss = PROC.memory_info().rss
    print(f"{what:44s} RSS {rss >> 20:6d} MiB   peak {PEAK[0] >> 20:6d} MiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--kv-cache-gib", type=float, default=0.1)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    args = ap.parse_args()
    threading.Thread(target=_sample, daemon=True).start()
    mark("start")
    import torch

    mark("import torch")
    import peft  # noqa: F401
    import transformers  # noqa: F401

    mark("import transformers, peft")
    from karma.models import resolve_policy
    from services.policy_trainer.config import ModelConfig
    from services.policy_trainer.policy import Policy

    path = resolve_policy("smollm2")
    cfg = ModelConfig(policy="smollm2", use_lora=True, gradient_checkpointing=args.gradient_checkpointing)
    policy = Policy.load(cfg, path, with_value_head=True)
    mark("LoRA policy loaded")
    if not args.no_vllm:
        from services.policy_trainer.engines import VLLMEngine

        engine = VLLMEngine(
            path,
            dtype="float32",
            max_model_len=128,
            seed=0,
            eos_ids={2},
            kv_cache_gib=args.kv_cache_gib,
            enforce_eager=True,
            max_num_seqs=args.max_num_seqs,
        )
        mark("vLLM engine started")
        engine.generate([[1, *range(100, 195)]] * 8, seed=0, max_new_tokens=32, temperature=1.0)
        mark("vLLM: 8 replies of 32 tokens")
    ids = torch.randint(100, 40000, (4, 128), generator=torch.Generator().manual_seed(0))
    att = torch.ones_like(ids)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    for i in range(3):
        t0 = time.perf_counter()
        with torch.no_grad():
            policy.forward_responses(ids, att, 96, 1.0, with_entropy=False)
            policy.forward_responses(ids, att, 96, 1.0, reference=True)
        mark(f"round {i}: policy + reference forward")
        policy.train()
        f = policy.forward_responses(ids, att, 96, 1.0)
        (f.logprobs.mean() + f.values.mean() + f.entropy.mean()).backward()
        opt.step()
        opt.zero_grad()
        policy.eval()
        mark(f"round {i}: forward + backward + step ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
