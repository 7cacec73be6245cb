"""Trainer speed, all in one run (SmolLM2-135M-Instruct policy, MiniLM reward model, vLLM rollouts):

1. step time with rewards over HTTP (`karma serve` in a subprocess on loopback) / step time with the same
   reward model in process (goal <= 1.10);
2. share of the HTTP steps' time spent waiting on rewards (goal <= 5 %);
3. rollout tokens/s of the vLLM engine / transformers `generate`, batch 8, same prompts (goal >= 2x).

    .venv/bin/python benchmarks/bench_train.py --pairs 3 --json /tmp/bench_train.json

One trainer and one vLLM engine serve every measurement: after a warm-up step, steps alternate between the
in-process and the HTTP reward source (order A B B A ...), so both see the same model state and machine
load (this machine is shared: absolute seconds vary, the paired ratios much less). The reward model is
MiniLM with an untrained head: its scoring cost is that of a trained one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from karma.paths import shared_data_dir

SHARED_DATA = shared_data_dir()


def summarise(rows: list[dict]) -> dict:
    mean = lambda k: statistics.fmean(r[k] for r in rows)
    return {
        "steps": len(rows),
        "step_s": mean("speed/step_s"),
        "reward_wait_s": mean("timing/reward_wait"),
        "reward_wait_share": statistics.fmean(r["timing/reward_wait"] / r["speed/step_s"] for r in rows),
        "rollout_s": mean("timing/rollout"),
        "logprobs_s": mean("timing/logprobs"),
        "update_s": mean("timing/update"),
        "sync_s": mean("timing/sync"),
        "rollout_tokens_per_s": mean("speed/rollout_tokens_per_s"),
    }


def throughput(engine, prompts: list[list[int]], max_new_tokens: int, repeats: int) -> float:
    engine.generate(prompts, seed=123, max_new_tokens=max_new_tokens, temperature=1.0)  # warm-up
    tokens, seconds = 0, 0.0
    for r in range(repeats):
        start = time.perf_counter()
        gens = engine.generate(prompts, seed=r, max_new_tokens=max_new_tokens, temperature=1.0)
        seconds += time.perf_counter() - start
        tokens += sum(len(g.response_ids) for g in gens)
    return tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--pairs", type=int, default=3, help="(in-process, HTTP) step pairs after the warm-up step"
    )
    ap.add_argument("--batch", type=int, default=8, help="prompts per step and generate batch")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--gen-tokens", type=int, default=64, help="tokens per sequence in the throughput test")
    ap.add_argument("--repeats", type=int, default=2, help="timed generate calls per engine")
    ap.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    ap.add_argument(
        "--prompts", default=f"file:{SHARED_DATA / 'eval' / 'politeness' / 'wikipedia.annotated.csv'}"
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    import torch

    from karma.models import minilm_path
    from karma.net import free_port
    from karma.rm.model import RewardModel, new_reward_model
    from services.policy_trainer.config import TrainConfig
    from services.policy_trainer.engines import HFEngine
    from services.policy_trainer.rewards import HTTPRewardSource, LocalRewardSource
    from services.policy_trainer.trainer import Trainer

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    rm_dir = new_reward_model(str(minilm_path()), "context", max_length=256).save(tmp / "rm")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "karma.cli", "serve", "--model", f"karma={rm_dir}", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cfg = TrainConfig.from_dict(
        {
            "model": {"policy": "smollm2"},
            "data": {"prompts": args.prompts, "max_prompt_length": 128, "max_prompts": 256},
            "rollout": {
                "engine": "vllm",
                "max_new_tokens": args.max_new_tokens,
                "vllm_enforce_eager": args.enforce_eager,
            },
            "reward": {"reward_model": str(rm_dir)},
            "ppo": {
                "prompts_per_step": args.batch,
                "mini_batch_size": args.batch,
                "micro_batch_size": 4,
                "epochs": 1,
                "learning_rate": 1e-6,
            },
            "run": {
                "steps": 1 + 2 * args.pairs,
                "output_dir": str(tmp / "run"),
                "save_every": 0,
                "report_to": ["jsonl"],
            },
        }
    )
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, cuda={torch.cuda.is_available()}",
        "args": {k: str(v) for k, v in vars(args).items()},
        "load_average_1m_at_start": os.getloadavg()[0],
    }
    t0 = time.perf_counter()
    local = LocalRewardSource(RewardModel.load(rm_dir))
    trainer = Trainer(cfg, reward_source=local)
    try:
        trainer.setup()
        http = HTTPRewardSource([f"http://127.0.0.1:{port}"], deadline_s=120)
        trainer.rewards.call(http.wait_ready, 300.0)
        rows: dict[str, list[dict]] = {"in_process": [], "http": []}
        trainer.train_step()  # warm-up (first-call costs of every phase)
        order = ["in_process", "http", "http", "in_process"] * args.pairs
        for name in order[: 2 * args.pairs]:
            trainer.rewards.source = local if name == "in_process" else http
            m = trainer.train_step()
            rows[name].append(m)
            print(
                f"step {m['step']} [{name}] {m['speed/step_s']:.1f}s, reward wait {m['timing/reward_wait']:.3f}s",
                flush=True,
            )
        results["in_process"] = summarise(rows["in_process"])
        results["http"] = summarise(rows["http"])
        prompts = [p.prompt_ids for p in trainer.prompts[: args.batch]]
        vllm_tps = throughput(trainer.engine, prompts, args.gen_tokens, args.repeats)
        hf_tps = throughput(
            HFEngine(trainer.policy, trainer.tokenizer, trainer.eos_ids),
            prompts,
            args.gen_tokens,
            args.repeats,
        )
        trainer.rewards.call(http.aclose)
    finally:
        trainer.close()
        server.terminate()
        server.wait(60)
    results["rollout_tokens_per_s"] = {"vllm": vllm_tps, "hf": hf_tps}
    results["ratios"] = {
        "http_over_in_process_step_time": results["http"]["step_s"] / results["in_process"]["step_s"],
        "http_reward_wait_share": results["http"]["reward_wait_share"],
        "vllm_over_hf_rollout_tokens_per_s": vllm_tps / hf_tps,
    }
    results["load_average_1m_at_end"] = os.getloadavg()[0]
    results["total_s"] = time.perf_counter() - t0
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    r = results["ratios"]
    print(f"\nHTTP / in-process step time: {r['http_over_in_process_step_time']:.3f} (goal <= 1.10)")
    print(f"reward-wait share (HTTP):    {100 * r['http_reward_wait_share']:.2f} % (goal <= 5 %)")
    print(f"vLLM / HF rollout tokens/s:  {r['vllm_over_hf_rollout_tokens_per_s']:.2f}x (goal >= 2x)")


if __name__ == "__main__":
    main()
