"""The trainer on tiny random models (2-layer Llama policy with SmolLM2's tokenizer, 2-layer BERT reward
model): config validation, bad input, engines, one update, exact resume, reward failures, HTTP rewards on a
real uvicorn, the CLI. Slow tests with the real SmolLM2 and vLLM are in test_trainer_slow.py."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import signal
import types
from pathlib import Path

import pytest
import torch

from karma.paths import shared_data_dir
from services.policy_trainer.config import TrainConfig
from services.policy_trainer.prompts import PromptSampler, PromptSourceError, load_records
from services.policy_trainer.rewards import LocalRewardSource, RewardUnavailableError
from services.policy_trainer.trainer import (
    CheckpointLoadError,
    Trainer,
    TrainingDivergedError,
    load_trainer_state,
)
from tests.support import cli_text

SHARED_DATA = shared_data_dir()
VOLATILE = ("timing/", "speed/")  # wall-clock metrics differ between runs


# ----------------------------------------------------------------------------------------------- fixtures
def make_tiny_policy(path: Path, *, vocab_size: int | None = None, seed: int = 0) -> Path:
    """A 2-layer hidden-32 Llama with SmolLM2's tokenizer (and chat template), tied embeddings."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from karma.models import smollm2_path

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> types.SimpleNamespace:
    from tests.support import make_tiny_rm

    root = tmp_path_factory.mktemp("trainer-assets")
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"question {i}: how do I pass exam {i}?"}) + "\n" for i in range(10))
    )
    return types.SimpleNamespace(
        policy=make_tiny_policy(root / "policy"),
        rm=make_tiny_rm(root / "rm", "context"),
        prompts=prompts,
        root=root,
    )


def tiny_config(assets, out: Path, **sections) -> TrainConfig:
    data = {
        "model": {"policy": str(assets.policy)},
        "data": {"prompts": f"file:{assets.prompts}", "max_prompt_length": 64},
        "rollout": {"engine": "hf", "max_new_tokens": 10},
        "reward": {"reward_model": str(assets.rm)},
        "ppo": {"prompts_per_step": 4, "mini_batch_size": 2, "micro_batch_size": 1, "learning_rate": 1e-3},
        "run": {"steps": 4, "output_dir": str(out), "save_every": 2, "report_to": ["jsonl"]},
        "eval": {"heldout_prompts": 4, "heldout_batch_size": 3},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return TrainConfig.from_dict(data)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def run(config: TrainConfig, source=None) -> tuple[Trainer, dict]:
    trainer = Trainer(config, reward_source=source)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    return trainer, result


# ----------------------------------------------------------------------------------------------- config
def test_config_rejects_bad_values_before_any_model_loads(assets, tmp_path):
    with pytest.raises(ValueError, match="ppo.algo: Input should be 'ppo', 'rloo' or 'grpo'"):
        tiny_config(assets, tmp_path, ppo={"algo": "dpo"})
    with pytest.raises(ValueError, match="rollout.engine: Input should be 'auto', 'hf' or 'vllm'"):
        tiny_config(assets, tmp_path, rollout={"engine": "sglang"})
    with pytest.raises(ValueError, match="rloo needs samples_per_prompt >= 2"):
        tiny_config(assets, tmp_path, ppo={"algo": "rloo"})
    with pytest.raises(ValueError, match=r"must be divisible by mini_batch_size \(3\)"):
        tiny_config(assets, tmp_path, ppo={"mini_batch_size": 3, "micro_batch_size": 1})
    with pytest.raises(ValueError, match="either reward_url .* or reward_model"):
        tiny_config(assets, tmp_path, reward={"reward_url": ["http://127.0.0.1:9"]})
    with pytest.raises(ValueError, match="ppo.kl_coeff: unknown key"):
        tiny_config(assets, tmp_path, ppo={"kl_coeff": 0.1})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        tiny_config(assets, tmp_path, rollout={"temperature": 0.0})
    with pytest.raises(ValueError, match="prompts must be 'reddit:DIR' or 'file:PATH'"):
        tiny_config(assets, tmp_path, data={"prompts": "hub:foo"})
    with pytest.raises(ValueError, match="ppo.kl_coef: Input should be greater than or equal to 0"):
        tiny_config(assets, tmp_path, ppo={"kl_coef": -1})


def test_defaults_then_file_then_environment_then_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "data: {prompts: 'file:p.jsonl'}\nreward: {reward_url: ['http://a:1,http://b:2']}\n"
        "ppo: {algo: grpo, samples_per_prompt: 4, kl_coef: 0.2, cliprange: 0.3}\nrun: {steps: 7}\n"
    )
    env = {"KARMA_TRAIN_KL_COEF": "0.25", "KARMA_TRAIN_CLIPRANGE": "0.4", "KARMA_TRAIN_REPORT_TO": "jsonl"}
    cfg = TrainConfig.from_sources(yaml_file, {"kl_coef": 0.3, "steps": None, "engine": "hf"}, environ=env)
    # flag > env > file > default, field by field
    assert (cfg.ppo.algo, cfg.ppo.kl_coef, cfg.ppo.cliprange, cfg.run.steps) == ("grpo", 0.3, 0.4, 7)
    assert (cfg.rollout.engine, cfg.run.report_to, cfg.ppo.lam) == ("hf", ["jsonl"], 0.95)
    assert cfg.reward.reward_url == ["http://a:1", "http://b:2"]
    assert cfg.ppo.batch_size == 32 and cfg.ppo.grad_accum_steps == 2
    again = TrainConfig.from_dict(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown option 'kl' for TrainConfig"):
        TrainConfig.from_sources(yaml_file, {"kl": 1})
    with pytest.raises(
        ValueError, match=r"ppo.kl_coef: .*valid number.* \(from environment KARMA_TRAIN_KL_COEF\)"
    ):
        TrainConfig.from_sources(yaml_file, environ={"KARMA_TRAIN_KL_COEF": "lots"})
    # the reward service address is shared with `karma eval`: KARMA_REWARD_URL
    cfg = TrainConfig.from_sources(yaml_file, environ={"KARMA_REWARD_URL": "http://c:3"})
    assert cfg.reward.reward_url == ["http://c:3"]


def test_train_flags_reach_the_config(tmp_path):
    """The generated command: a flag, an environment variable and the file each land in the config
    `karma train` would run (`--print-config` prints it and stops)."""
    import yaml
    from typer.testing import CliRunner

    from karma.cli import app

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("data: {prompts: 'file:p.jsonl'}\nppo: {kl_coef: 0.2, epochs: 3}\n")
    args = ["train", "-c", str(yaml_file), "--print-config", "--reward-model", "rm", "--kl-coef", "0.5"]
    args += ["--no-whiten-advantages", "--report-to", "jsonl", "--report-to", "tensorboard", "--algo", "rloo"]
    args += ["--samples-per-prompt", "2"]
    result = CliRunner().invoke(app, args, env={"KARMA_TRAIN_EPOCHS": "4"})
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.output)
    assert (
        cfg["ppo"].items()
        >= {"kl_coef": 0.5, "epochs": 4, "whiten_advantages": False, "algo": "rloo"}.items()
    )
    assert cfg["run"]["report_to"] == ["jsonl", "tensorboard"] and cfg["reward"]["reward_model"] == "rm"
    bad = CliRunner().invoke(app, ["train", "-c", str(yaml_file), "--reward-model", "rm", "--lam", "2"])
    assert (
        bad.exit_code == 2
        and "ppo.lam: Input should be less than or equal to 1 (from flag --lam)" in bad.output
    )


# ----------------------------------------------------------------------------------------------- prompts
def test_prompt_sources(tmp_path):
    from tests.support import write_prepared_data

    data = write_prepared_data(tmp_path / "prep", n_threads=20, comments_per_thread=3)
    recs = load_records(f"reddit:{data}", split="train")
    contexts = [r.context for r in recs]
    assert len(contexts) == len(set(contexts)) == 14  # one prompt per thread context (70 % of 20 threads)
    assert recs[0].metadata["subreddit"] in ("College", "ApplyingToCollege") and "depth" in recs[0].metadata
    assert len(load_records(f"reddit:{data}", split="val", max_prompts=2)) == 2

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(PromptSourceError, match=f"no prompts in {empty}"):
        load_records(f"file:{empty}")
    with pytest.raises(PromptSourceError, match="prompt file not found"):
        load_records(f"file:{tmp_path / 'missing.csv'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(PromptSourceError, match="no prompt column among prompt, context, Request"):
        load_records(f"file:{bad}")


def test_politeness_requests_are_file_prompts():
    csv_file = SHARED_DATA / "eval" / "politeness" / "wikipedia.annotated.csv"
    if not csv_file.exists():
        pytest.skip(f"shared data not found: {csv_file}")
    recs = load_records(f"file:{csv_file}")
    assert len(recs) == 4353
    assert recs[0].context.startswith("Where did you learn English?") and recs[0].metadata is None


def test_chat_template_prompt_is_cut_from_the_left(assets):
    from transformers import AutoTokenizer

    from services.policy_trainer.prompts import render_prompt

    tok = AutoTokenizer.from_pretrained(assets.policy)
    long = " ".join(f"word{i}" for i in range(300)) + " FINAL QUESTION?"
    text, ids = render_prompt(tok, long, system_prompt="Reply briefly.", max_length=64)
    assert len(ids) <= 64
    assert text.startswith("<|im_start|>system\nReply briefly.") and text.endswith("<|im_start|>assistant\n")
    assert "FINAL QUESTION?" in text and "word0 " not in text


def test_prompts_are_rendered_only_when_a_step_draws_them(assets, tmp_path):
    from services.policy_trainer.prompts import render_prompt

    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps(f"question {i}: " + "why " * (i % 50)) + "\n" for i in range(300)))
    trainer = Trainer(tiny_config(assets, tmp_path / "out", data={"prompts": f"file:{many}"}))
    try:
        trainer.setup()
        assert len(trainer.prompts) == 296 and trainer.prompts.rendered == 0  # 4 held out, none rendered yet
        trainer.train_step()
        assert trainer.prompts.rendered == 4  # prompts_per_step
        p = trainer.prompts[-1]
        assert (p.prompt_text, p.prompt_ids) == render_prompt(
            trainer.tokenizer, p.context, system_prompt=None, max_length=64
        )
        assert [q.context for q in trainer.prompts[:2]] == [r.context for r in trainer.prompts.records[:2]]
        with pytest.raises(IndexError, match="prompt index 296 out of range for 296 prompts"):
            trainer.prompts[296]
    finally:
        trainer.close()


def test_example_config_is_valid():
    from services.policy_trainer.config import vllm_available

    example = Path(__file__).parents[1] / "services/policy_trainer/configs/ppo_smollm2.yaml"
    if not vllm_available():
        with pytest.raises(ValueError, match="engine 'vllm' needs the vllm package"):
            TrainConfig.from_sources(example)
        return
    cfg = TrainConfig.from_sources(example)
    assert (
        cfg.rollout.engine == "vllm" and cfg.data.prompts.startswith("reddit:") and cfg.ppo.kl_target == 6.0
    )
    assert (
        cfg.ppo.learning_rate == 2e-5 and cfg.ppo.missing_eos_penalty == 0 and cfg.eval.heldout_prompts == 128
    )


def test_positive_control_config_is_valid():
    cfg = TrainConfig.from_sources(
        Path(__file__).parents[1] / "services/policy_trainer/configs/ppo_positive_control.yaml"
    )
    assert (cfg.rollout.engine, cfg.ppo.algo, cfg.run.steps, cfg.eval.heldout_prompts) == ("hf", "ppo", 6, 64)
    assert cfg.data.prompts.startswith("file:") and cfg.ppo.missing_eos_penalty == 0


def test_prompt_sampler_resumes_its_order():
    a = PromptSampler(5, seed=3)
    first = a.take(7)
    b = PromptSampler(5, seed=3)
    b.load_state_dict(a.state_dict())
    assert sorted(first[:5]) == list(range(5))  # every prompt once per pass
    assert a.take(6) == b.take(6)


# ----------------------------------------------------------------------------------------------- bad input
def test_policy_without_tokenizer_is_refused_before_training(assets, tmp_path):
    from services.policy_trainer.policy import PolicyLoadError

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((assets.policy / "config.json").read_text())
    trainer = Trainer(tiny_config(assets, tmp_path / "out", model={"policy": str(bare)}))
    with pytest.raises(PolicyLoadError, match=f"policy folder {bare} has no tokenizer"):
        trainer.setup()


def test_unreachable_reward_url_fails_at_start(assets, tmp_path):
    from karma.net import free_port

    url = f"http://127.0.0.1:{free_port()}"
    cfg = tiny_config(
        assets,
        tmp_path / "out",
        reward={"reward_model": None, "reward_url": [url], "reward_ready_timeout_s": 1.0},
    )
    trainer = Trainer(cfg)
    try:
        with pytest.raises(RewardUnavailableError, match=f"reward service unreachable at start: .*{url}"):
            trainer.setup()
        assert not hasattr(trainer, "policy")  # failed before any model loaded
    finally:
        trainer.close()


def test_empty_prompt_file_is_named(assets, tmp_path):
    empty = tmp_path / "none.csv"
    empty.write_text("Request\n")
    trainer = Trainer(tiny_config(assets, tmp_path / "out", data={"prompts": f"file:{empty}"}))
    try:
        with pytest.raises(PromptSourceError, match=f"no prompts in {empty}"):
            trainer.setup()
    finally:
        trainer.close()


# ----------------------------------------------------------------------------------------------- engines, forward
def test_hf_engine_reports_each_generation_once_and_early(tmp_path):
    """A tiny-vocabulary model emits EOS often: finished rows are reported during generation, once each."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from services.policy_trainer.engines import HFEngine

    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=6,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    ).eval()
    engine = HFEngine(types.SimpleNamespace(lm=lm), types.SimpleNamespace(pad_token_id=0), {2})
    calls = []
    prompts = [[1, 3, 4], [1, 5], [4], [3, 3, 3, 1], [5, 4], [1], [3], [4, 4]]
    gens = engine.generate(prompts, seed=1, max_new_tokens=20, temperature=1.0, on_finished=calls.append)
    reported = [g.index for call in calls for g in call]
    assert sorted(reported) == list(range(len(prompts)))
    assert len(calls) > 1  # not everything at the end
    for g in gens:
        assert (2 in g.response_ids) == g.ended_with_eos
        if g.ended_with_eos:
            assert g.response_ids.index(2) == len(g.response_ids) - 1
        else:
            assert len(g.response_ids) == 20
    again = engine.generate(prompts, seed=1, max_new_tokens=20, temperature=1.0)
    assert [g.response_ids for g in again] == [g.response_ids for g in gens]  # seeded


def test_hf_engine_samples_the_full_distribution():
    """No top-k / top-p sneaks in (transformers defaults top_k to 50): a uniform 200-token model must emit
    far more than 50 distinct tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from services.policy_trainer.engines import HFEngine

    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=200,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            eos_token_id=199,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
    ).eval()
    torch.nn.init.zeros_(lm.lm_head.weight)  # uniform next-token distribution
    engine = HFEngine(types.SimpleNamespace(lm=lm), types.SimpleNamespace(pad_token_id=0), {199})
    gens = engine.generate([[1, 2]] * 8, seed=0, max_new_tokens=25, temperature=1.0)
    distinct = {t for g in gens for t in g.response_ids}
    assert len(distinct) > 80


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_the_lr_schedule_resumes_exactly_from_a_weights_only_checkpoint(tmp_path, schedule):
    from services.policy_trainer.build import optimizer_and_schedule
    from services.policy_trainer.config import PPOConfig

    p = PPOConfig(
        lr_scheduler=schedule,
        warmup_steps=3,
        learning_rate=1.0,
        prompts_per_step=2,
        mini_batch_size=1,
        micro_batch_size=1,
        epochs=1,
    )  # 2 optimizer steps per step
    steps = 5

    def fresh():
        return optimizer_and_schedule([torch.nn.Parameter(torch.zeros(1))], p, steps)

    opt, sched = fresh()
    whole = []
    for _ in range(10):
        opt.step()
        sched.step()
        whole.append(sched.get_last_lr()[0])
    assert whole[:3] == pytest.approx(
        [1 / 3, 2 / 3, 1.0]
    )  # transformers' warm-up: lr 0 before the first step
    if schedule != "constant":
        assert whole[-1] == pytest.approx(0.0, abs=1e-12) and whole[3] > whole[5]
    opt, sched = fresh()
    for _ in range(4):
        opt.step()
        sched.step()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp_path / "s.pt")
    state = load_trainer_state(tmp_path / "s.pt")  # weights_only
    opt, sched = fresh()
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    resumed = []
    for _ in range(6):
        opt.step()
        sched.step()
        resumed.append(sched.get_last_lr()[0])
    assert resumed == whole[4:]


def test_the_pad_helper_and_the_trainer_batch_layout():
    from karma.tensors import left_pad, right_pad
    from services.policy_trainer.policy import pack_sequences

    ids, mask = left_pad([[5, 6, 7], [8], []], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]] and mask.tolist() == [
        [1, 1, 1],
        [0, 0, 1],
        [0, 0, 0],
    ]
    ids, mask = right_pad([(5,), (6, 7)], 9, width=3)
    assert ids.tolist() == [[5, 9, 9], [6, 7, 9]] and mask.tolist() == [[1, 0, 0], [1, 1, 0]]
    assert ids.dtype == mask.dtype == torch.long
    with pytest.raises(ValueError, match="a sequence of 2 tokens does not fit in width 1"):
        left_pad([[1, 2]], 0, width=1)
    packed = pack_sequences([[1, 2, 3], [4]], [[10, 11], []], pad_id=0)
    assert packed.prompt_len == 3
    assert packed.input_ids.tolist() == [[1, 2, 3, 10, 11], [0, 0, 4, 0, 0]]
    assert packed.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 0, 0]]
    assert (
        packed.response_mask.tolist() == [[1.0, 1.0], [0.0, 0.0]]
        and packed.response_mask.dtype == torch.float32
    )
    assert pack_sequences([[1]], [[]], pad_id=0).response_mask.shape == (1, 1)  # at least one response column


def test_response_logprobs_do_not_depend_on_padding(assets):
    from services.policy_trainer.config import ModelConfig
    from services.policy_trainer.policy import Policy

    # float64 (unit roundoff 1.1e-16): a padded row and the same row alone sum in other orders, which float32
    # rounds differently (~1e-6 here, a figure of the CPU's kernels); in float64 the same orders differ by
    # ~1e-14, so 1e-10 holds on any IEEE-754 CPU while wrong position ids or a leaking pad (what this test is
    # about) change log-probs by ~1e-1.
    cfg = ModelConfig(policy=str(assets.policy), dtype="float64")
    policy = Policy.load(cfg, str(assets.policy), with_value_head=True)
    prompts, responses = [[1, 520, 9531], [1, 4093, 198, 6004, 2, 198, 1]], [[30, 31, 32, 2], [40, 41]]
    P, T = 7, 4
    ids = torch.full((2, P + T), 2)
    att = torch.zeros((2, P + T), dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[b, P - len(p) : P], ids[b, P : P + len(r)] = torch.tensor(p), torch.tensor(r)
        att[b, P - len(p) : P + len(r)] = 1
    batched = policy.forward_responses(ids, att, P, 1.0)
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        single_ids = torch.tensor([p + r])
        alone = policy.forward_responses(single_ids, torch.ones_like(single_ids), len(p), 1.0)
        assert batched.logprobs.dtype == torch.float64
        torch.testing.assert_close(batched.logprobs[b, : len(r)], alone.logprobs[0], atol=1e-10, rtol=0)
        torch.testing.assert_close(batched.values[b, : len(r)], alone.values[0], atol=1e-10, rtol=0)
    ref = policy.forward_responses(ids, att, P, 1.0, reference=True)
    torch.testing.assert_close(ref.logprobs, batched.logprobs)  # nothing trained yet


# ----------------------------------------------------------------------------------------------- updates
@pytest.mark.parametrize(
    "algo,extra",
    [
        ("ppo", {}),
        ("rloo", {"samples_per_prompt": 2, "prompts_per_step": 2}),
        ("grpo", {"samples_per_prompt": 2, "prompts_per_step": 2}),
    ],
)
def test_one_step_changes_every_trainable_parameter(assets, tmp_path, algo, extra):
    cfg = tiny_config(assets, tmp_path / "out", ppo={"algo": algo, **extra})
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        before = {n: p.detach().clone() for n, p in trainer.policy.trainable_named_parameters()}
        ref_before = {
            n: p.detach().clone() for n, p in trainer.policy.named_parameters() if n.startswith("ref_lm.")
        }
        metrics = trainer.train_step()
        after = dict(trainer.policy.trainable_named_parameters())
        unchanged = [n for n, p in before.items() if torch.equal(p, after[n])]
        assert not unchanged, unchanged
        assert any(n.startswith("value_head.") for n in before) == (algo == "ppo")
        for n, p in trainer.policy.named_parameters():  # the reference policy stays frozen
            if n in ref_before:
                assert torch.equal(p, ref_before[n])
        for key in (
            "reward/mean",
            "reward/std",
            "reward/min",
            "reward/max",
            "objective/kl",
            "objective/kl_coef",
            "policy/approx_kl",
            "policy/clipfrac",
            "objective/entropy",
            "response/length_mean",
            "speed/rollout_tokens_per_s",
            "timing/rollout",
            "timing/reward_wait",
            "timing/update",
        ):
            assert key in metrics, key
        if algo == "ppo":
            assert "loss/value" in metrics and "value/explained_variance" in metrics
        if algo == "grpo":
            assert metrics["loss/kl"] >= 0
    finally:
        trainer.close()


def sync_through_a_fake_vllm_worker(policy) -> list[str]:
    """`VLLMEngine.sync_weights` against a stand-in for vLLM's worker that, like `reload_weights`, consumes the
    weights one at a time and keeps none of them; returns the names it received."""
    import gc

    from services.policy_trainer.engines import VLLMEngine

    received: list[str] = []

    def reload_weights(weights_iterator):
        for name, tensor in weights_iterator:
            received.append(name)
            del tensor
            gc.collect()

    worker = types.SimpleNamespace(
        reload_weights=reload_weights, model_runner=types.SimpleNamespace(model=types.SimpleNamespace())
    )
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.llm = types.SimpleNamespace(
        llm_engine=types.SimpleNamespace(
            model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(worker=worker))
        ),
        reset_prefix_cache=lambda: None,
    )
    engine.sync_weights(policy)
    return received


def test_lora_trains_adapters_only_and_saves_a_merged_folder(assets, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(
        assets,
        tmp_path / "out",
        model={"use_lora": True, "lora_r": 4, "lora_alpha": 8},
        run={"steps": 1, "save_every": 0},
    )
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        names = [n for n, _ in trainer.policy.trainable_named_parameters()]
        assert names and all("lora_" in n or n.startswith("value_head.") for n in names)
        trainer.fit()
        merged = dict(trainer.policy.lm_weights_for_inference())
        synced = sync_through_a_fake_vllm_worker(trainer.policy)
        # PEFT's own merge of a copy: what the folder (written layer by layer, no copy) must hold exactly
        peft_merged = copy.deepcopy(trainer.policy.lm).merge_and_unload().state_dict()
    finally:
        trainer.close()
    # the engine's sync sends every weight even though it holds none of them (vLLM reads one at a time): LoRA
    # layers yield fresh tensors whose memory the next one could reuse, which once looked like a tied weight
    assert synced == [n for n in merged if n != "lm_head.weight"]  # the tied head: once, as the embedding
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    state = model.state_dict()
    # what the vLLM engine is sent: exactly the plain model's parameters, LoRA merged
    assert set(merged) == {n for n, _ in model.named_parameters()} | {"lm_head.weight"}
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(state[q], merged[q])
    base = AutoModelForCausalLM.from_pretrained(assets.policy).state_dict()
    assert not torch.equal(state[q], base[q])  # the adapters were merged in
    assert state.keys() == peft_merged.keys()
    for name, tensor in state.items():  # the same additions in the same order: equal to the bit
        assert torch.equal(tensor, peft_merged[name]), name


def test_train_writes_a_loadable_policy_and_metrics(assets, tmp_path):
    from transformers import AutoModelForCausalLM

    from services.policy_trainer import train

    cfg = tiny_config(assets, tmp_path / "out", run={"steps": 2, "report_to": ["jsonl", "tensorboard"]})
    out = train(cfg)
    assert out == tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(assets.policy)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # first rollout: policy == reference
    assert rows[1]["objective/kl"] != 0.0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))  # the version string is no scalar
    version = LocalRewardSource.load(assets.rm).version
    assert version and [r["reward/version"] for r in rows] == [version, version]
    assert (out / "checkpoints" / "step-000002" / "trainer_state.pt").exists()
    assert json.loads((out / "trainer_result.json").read_text())["status"] == "completed"


# ----------------------------------------------------------------------------------------------- resume
class SignalAfter(LocalRewardSource):
    """Sends SIGTERM to this process on its n-th scoring call (a user pressing stop mid-step)."""

    def __init__(self, rm, n: int):
        super().__init__(rm)
        self.n, self.calls = n, 0

    async def score(self, items):
        self.calls += 1
        if self.calls == self.n:
            os.kill(os.getpid(), signal.SIGTERM)
        return await super().score(items)


class FailAfter(LocalRewardSource):
    """A reward service that dies on its n-th call."""

    def __init__(self, rm, n: int):
        super().__init__(rm)
        self.n, self.calls = n, 0

    async def score(self, items):
        self.calls += 1
        if self.calls >= self.n:
            raise RewardUnavailableError("reward service failed after 3 attempt(s) in 2.0s (http://x)")
        return await super().score(items)


@pytest.fixture(scope="module")
def whole_run(assets, tmp_path_factory) -> types.SimpleNamespace:
    """The uninterrupted 4-step reference run."""
    from karma.rm.model import RewardModel

    out = tmp_path_factory.mktemp("whole") / "run"
    rm = RewardModel.load(assets.rm)
    trainer, _ = run(tiny_config(assets, out), LocalRewardSource(rm))
    metrics = stable(read_metrics(out))
    assert len(metrics) == 4
    return types.SimpleNamespace(
        out=out,
        rm=rm,
        metrics=metrics,
        params={n: p.detach().clone() for n, p in trainer.policy.trainable_named_parameters()},
    )


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(assets, whole_run, tmp_path):
    _, stopped = run(tiny_config(assets, tmp_path / "cut"), SignalAfter(whole_run.rm, n=2))
    assert stopped["status"] == "stopped (SIGTERM)" and 1 <= stopped["step"] < 4
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # no final policy for a stopped run
    resumed, done = run(
        tiny_config(assets, tmp_path / "cut", run={"resume": True}), LocalRewardSource(whole_run.rm)
    )
    assert done["status"] == "completed" and done["step"] == 4
    assert stable(read_metrics(tmp_path / "cut")) == whole_run.metrics
    for n, p in resumed.policy.trainable_named_parameters():
        assert torch.equal(p, whole_run.params[n]), n


def test_dead_reward_service_checkpoints_then_stops_with_a_named_error(assets, whole_run, tmp_path):
    with pytest.raises(
        RewardUnavailableError, match=r"training stopped before step 3; checkpoint saved to .*step-000002"
    ):
        run(tiny_config(assets, tmp_path / "dead", run={"save_every": 0}), FailAfter(whole_run.rm, n=3))
    rows = read_metrics(tmp_path / "dead")
    assert [r["step"] for r in rows] == [1, 2]  # never a step with a missing / zero reward
    result = json.loads((tmp_path / "dead" / "trainer_result.json").read_text())
    assert (result["status"], result["error_type"], result["step"]) == ("failed", "RewardUnavailableError", 2)
    assert result["checkpoint"] == str(tmp_path / "dead" / "checkpoints" / "step-000002")
    assert (
        result["error"].startswith("reward service failed after 3 attempt(s)")
        and result["last_metrics"]["step"] == 2
    )
    run(tiny_config(assets, tmp_path / "dead", run={"resume": True}), LocalRewardSource(whole_run.rm))
    assert stable(read_metrics(tmp_path / "dead")) == whole_run.metrics
    assert json.loads((tmp_path / "dead" / "trainer_result.json").read_text())["status"] == "completed"


class ScoreAfter(LocalRewardSource):
    """Scores with the RM, then from its n-th call on gives every response `value` (e.g. 1e30: finite, but
    PPO's squared value error of it overflows float32)."""

    def __init__(self, rm, n: int, value: float):
        super().__init__(rm)
        self.n, self.value, self.calls = n, value, 0

    async def score(self, items):
        self.calls += 1
        if self.calls >= self.n:
            return [self.value] * len(items)
        return await super().score(items)


def test_a_diverging_update_stops_before_its_gradient_with_a_named_error(assets, whole_run, tmp_path):
    out = tmp_path / "div"
    with pytest.raises(
        TrainingDivergedError,
        match=r"non-finite loss/value = inf.* in the update of step 3 "
        r"\(epoch 1, minibatch 1\) -- training stopped before step 3; checkpoint saved to "
        r".*step-000002 \(continue with --resume\)",
    ) as info:
        run(tiny_config(assets, out, run={"save_every": 0}), ScoreAfter(whole_run.rm, n=3, value=1e30))
    assert info.value.step == 3 and info.value.values["loss/value"] == float("inf")
    assert [r["step"] for r in read_metrics(out)] == [1, 2]  # nothing logged for the diverged step
    result = json.loads((out / "trainer_result.json").read_text())
    assert (result["status"], result["error_type"], result["step"]) == ("failed", "TrainingDivergedError", 2)
    assert (
        result["checkpoint"] == str(out / "checkpoints" / "step-000002") and "non-finite" in result["error"]
    )
    # the checkpoint is the exact state before step 3: resumed with sane rewards, the run is the reference run
    resumed, _ = run(tiny_config(assets, out, run={"resume": True}), LocalRewardSource(whole_run.rm))
    assert stable(read_metrics(out)) == whole_run.metrics
    for n, p in resumed.policy.trainable_named_parameters():
        assert torch.equal(p, whole_run.params[n]), n


def test_a_non_finite_gradient_norm_mid_step_stops_and_keeps_the_part_updated_state_unsaved(
    assets, tmp_path, monkeypatch
):
    real_clip = torch.nn.utils.clip_grad_norm_
    clips: list[float] = []

    def clip(params, max_norm):  # the second minibatch's gradient norm overflows
        norm = real_clip(params, max_norm)
        clips.append(float(norm))
        return torch.tensor(float("nan")) if len(clips) == 2 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    out = tmp_path / "out"
    with pytest.raises(
        TrainingDivergedError,
        match=r"^non-finite policy/grad_norm = nan in the update of step 1 "
        r"\(epoch 1, minibatch 2\) -- training stopped in step 1 after 1 optimizer step\(s\) of it; "
        r"that state is not saved; newest checkpoint: none$",
    ):
        run(tiny_config(assets, out))
    assert not list(out.glob("checkpoints/step-*"))  # a part-updated state is never saved as a step
    result = json.loads((out / "trainer_result.json").read_text())
    assert (result["status"], result["step"], result["checkpoint"]) == ("failed", 0, None)


def test_the_metrics_row_is_written_before_the_checkpoint(assets, tmp_path, monkeypatch):
    class Killed(Exception):
        pass

    def killed_while_saving(self):
        raise Killed("killed while writing the checkpoint")

    monkeypatch.setattr(Trainer, "save_checkpoint", killed_while_saving)
    out = tmp_path / "out"
    with pytest.raises(Killed):
        run(tiny_config(assets, out, run={"steps": 2, "save_every": 1}))
    assert [r["step"] for r in read_metrics(out)] == [1]  # the step's row survived the kill
    result = json.loads((out / "trainer_result.json").read_text())
    assert (
        result["status"],
        result["error_type"],
        result["error"],
        result["step"],
        result["checkpoint"],
    ) == ("failed", "Killed", "killed while writing the checkpoint", 1, None)


class RunsCode:
    """Unpickling this creates a folder: stands for whatever code a crafted checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_resume_refuses_a_checkpoint_that_would_run_code(assets, whole_run, tmp_path):
    good = load_trainer_state(
        whole_run.out / "checkpoints" / "step-000004" / "trainer_state.pt"
    )  # weights_only
    assert good["step"] == 4 and isinstance(good["rng"]["torch"], torch.Tensor)
    assert isinstance(good["rng"]["numpy"]["key"], list) and isinstance(
        good["rng"]["python"]["internal"], list
    )
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "out" / "checkpoints" / "step-000001" / "trainer_state.pt"
    crafted.parent.mkdir(parents=True)
    torch.save(good | {"step": 1, "sampler": RunsCode(marker)}, crafted)
    trainer = Trainer(tiny_config(assets, tmp_path / "out", run={"resume": True}))
    try:
        with pytest.raises(
            CheckpointLoadError,
            match=rf"refusing to load {re.escape(str(crafted))}: it holds "
            r"os.makedirs, and unpickling it could run code",
        ):
            trainer.setup()
    finally:
        trainer.close()
    assert not marker.exists()
    torch.load(crafted, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.is_dir()


def test_fresh_run_refuses_a_folder_with_checkpoints(assets, whole_run):
    trainer = Trainer(tiny_config(assets, whole_run.out))
    try:
        with pytest.raises(FileExistsError, match="already holds checkpoints"):
            trainer.setup()
        assert not hasattr(trainer, "policy")
    finally:
        trainer.close()


# ----------------------------------------------------------------------------------------------- HTTP rewards
@pytest.fixture(scope="module")
def reward_url(assets):
    from services.reward_api.core.config import Settings
    from services.reward_api.main import create_app
    from tests.support import serve_in_thread

    with serve_in_thread(create_app(Settings(models={"tiny": str(assets.rm)}, max_wait_ms=1))) as url:
        yield url


def test_http_reward_equals_in_process_score(assets, reward_url):
    from karma.protocol import ScoreItem
    from karma.rm.model import RewardModel
    from services.policy_trainer.rewards import HTTPRewardSource

    items = [
        ScoreItem(context="Why is the sky blue?", response="Rayleigh scattering.", metadata={"depth": 0}),
        ScoreItem(context="My essay is due tomorrow.\n\nAny tips?", response="Start with an outline."),
        ScoreItem(context=[{"content": "a post"}, {"content": "a reply"}], response="lol"),
    ]
    local = LocalRewardSource(RewardModel.load(assets.rm))

    async def both():
        http = HTTPRewardSource([reward_url], deadline_s=10)
        try:
            return await http.score(items), await local.score(items), http.version
        finally:
            await http.aclose()

    over_http, in_process, version = asyncio.run(both())
    assert over_http == pytest.approx(in_process, abs=1e-5)
    assert len(set(over_http)) == 3
    assert version == local.version == RewardModel.load(assets.rm).version


def bad_reward_service(kind: str):
    """A MockTransport handler: ready, but every score answer is wrong in the way `kind` says."""
    import httpx

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/ready"):
            return httpx.Response(200, json={"ready": True, "models": {"a": "ready"}})
        n = len(json.loads(request.content)["items"])
        body = {"model": "a", "version": "v1", "scores": [0.5] * n, "truncated": [False] * n}
        if kind == "not-json":
            return httpx.Response(200, text="<html>502 bad gateway</html>")
        if kind == "no-version":
            del body["version"]
        elif kind == "null-score":
            body["scores"][-1] = None
        elif kind == "string-scores":
            body["scores"] = ["0.5"] * n
        elif kind == "nan":
            body["scores"][0] = float("nan")
        return httpx.Response(
            200, content=json.dumps(body).encode(), headers={"content-type": "application/json"}
        )

    return handler


@pytest.mark.parametrize(
    "kind,message",
    [
        pytest.param(
            "not-json",
            r"POST http://rm1:8000/v1/score answered 200 with a body that is not JSON: "
            r"'<html>502 bad gateway",
            id="not-json",
        ),
        pytest.param(
            "no-version", r"POST http://rm1:8000/v1/score answered 200 with no 'version'", id="no-version"
        ),
        pytest.param(
            "null-score",
            r"POST http://rm1:8000/v1/score answered 200 with scores\[\d\] is null, not a number",
            id="null-score",
        ),
        pytest.param(
            "string-scores",
            r'POST http://rm1:8000/v1/score answered 200 with scores\[0\] is "0.5" '
            r"\(a string\), not a number",
            id="string-scores",
        ),
        pytest.param("nan", r"the reward source returned no/non-finite scores: \[nan", id="nan"),
    ],
)
def test_a_wrong_reward_answer_checkpoints_then_stops_with_a_named_error(assets, tmp_path, kind, message):
    import httpx

    from services.policy_trainer.rewards import HTTPRewardSource

    source = HTTPRewardSource(
        ["http://rm1:8000"], deadline_s=5, transport=httpx.MockTransport(bad_reward_service(kind))
    )
    out = tmp_path / "out"
    with pytest.raises(
        RewardUnavailableError,
        match=message + r".* -- training stopped before step 1; checkpoint saved "
        r"to .*step-000000 \(continue with --resume\)",
    ):
        run(tiny_config(assets, out, run={"steps": 1}), source)
    result = json.loads((out / "trainer_result.json").read_text())
    assert (result["status"], result["error_type"], result["step"]) == ("failed", "RewardUnavailableError", 0)
    assert result["checkpoint"] == str(out / "checkpoints" / "step-000000")


def test_a_source_missing_part_of_the_protocol_is_refused():
    from services.policy_trainer.rewards import RewardDispatcher

    class ScoreOnly:  # no version, wait_ready or aclose: nothing is guessed
        async def score(self, items):
            return [0.0] * len(items)

    with pytest.raises(TypeError, match="ScoreOnly is not a RewardSource"):
        RewardDispatcher(ScoreOnly())


def test_rollout_items_reach_the_wire_plain_and_the_version_is_logged(assets, tmp_path, caplog):
    """The trainer builds one `ScoreItem` per reply, its prompt's metadata made plain once (numpy scalars ->
    JSON numbers, NaN -> absent), sent as is; the model version of every step's scores is in its row, and
    a hot swap between steps is logged."""
    import httpx
    import numpy as np

    from services.policy_trainer.prompts import PromptRecord
    from services.policy_trainer.rewards import HTTPRewardSource

    bodies: list[bytes] = []
    service = {"version": "v1"}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/ready"):
            return httpx.Response(200, json={"ready": True, "models": {"a": "ready"}})
        bodies.append(request.content)
        items = json.loads(request.content)["items"]
        n = len(items)
        scores = [len(it["response"]) / 10 for it in items]
        return httpx.Response(
            200,
            json={"model": "a", "version": service["version"], "scores": scores, "truncated": [False] * n},
        )

    sent = []

    class Recording(HTTPRewardSource):
        async def score(self, items):
            sent.extend(items)
            return await super().score(items)

    source = Recording(["http://rm1:8000"], deadline_s=5, transport=httpx.MockTransport(handler))
    meta = {
        "subreddit": np.str_("College"),
        "depth": np.int64(2),
        "sibling_count": np.float64(3.0),  # pandas makes an int column with gaps float
        "seconds_since_post": float("nan"),  # pandas' missing value
        "seconds_since_parent": np.float32(1.5),
    }
    cfg = tiny_config(
        assets, tmp_path / "out", run={"steps": 2, "save_every": 0}, eval={"heldout_prompts": 0}
    )
    trainer = Trainer(cfg, reward_source=source)
    try:
        trainer.setup()
        trainer.prompts.records = [PromptRecord(r.context, dict(meta)) for r in trainer.prompts.records]
        trainer.prompts._cache.clear()
        with caplog.at_level("INFO", logger="services.policy_trainer.trainer"):
            first = trainer.train_step()
            service["version"] = "v2"  # the service's model is hot-swapped between the steps
            second = trainer.train_step()
    finally:
        trainer.close()
    plain = {"subreddit": "College", "depth": 2, "sibling_count": 3, "seconds_since_parent": 1.5}
    wire = [it for body in bodies for it in json.loads(body)["items"]]
    assert len(wire) == 2 * 4 and all(it["metadata"] == plain for it in wire)
    assert all(
        type(it["metadata"]["depth"]) is int and type(it["metadata"]["sibling_count"]) is int for it in wire
    )
    assert b"NaN" not in b"".join(bodies)
    # validated once per prompt: every item carries its prompt's one Metadata object, not a copy
    drawn = {id(p.rm_metadata) for p in trainer.prompts._cache.values()}
    assert {id(it.metadata) for it in sent} <= drawn and len(drawn) == len(trainer.prompts._cache)
    assert (first["reward/version"], second["reward/version"]) == ("v1", "v2")
    assert [r["reward/version"] for r in read_metrics(tmp_path / "out")] == ["v1", "v2"]
    assert "reward model version v1 (step 1)" in caplog.text
    assert "reward model version changed from v1 to v2 at step 2 (hot swap)" in caplog.text


def test_invalid_prompt_metadata_is_a_named_error_when_drawn():
    from services.policy_trainer.prompts import Prompt

    with pytest.raises(
        PromptSourceError,
        match=r"(?s)invalid metadata .* of prompt 'why\?'.*depth.*greater than or equal to 0",
    ):
        Prompt("why?", "why?", [1, 2], {"depth": -1})
    assert Prompt("why?", "why?", [1, 2], {}).rm_metadata is None


def test_training_over_http_on_loopback(assets, reward_url, tmp_path):
    cfg = tiny_config(
        assets,
        tmp_path / "out",
        run={"steps": 2},
        reward={
            "reward_model": None,
            "reward_url": [reward_url, reward_url],
            "reward_deadline_s": 3.0,
            "reward_timeout_s": 2.0,
        },
    )
    _, result = run(cfg)
    assert result["status"] == "completed"
    rows = read_metrics(tmp_path / "out")
    assert len(rows) == 2 and all(r["reward/std"] > 0 for r in rows)


def test_http_service_going_down_mid_run(assets, tmp_path, caplog):
    from services.reward_api.core.config import Settings
    from services.reward_api.main import create_app
    from tests.support import serve_in_thread

    cfg = tiny_config(
        assets,
        tmp_path / "out",
        run={"steps": 3},
        reward={
            "reward_model": None,
            "reward_url": ["http://127.0.0.1:1"],
            "reward_deadline_s": 2.0,
            "reward_timeout_s": 1.0,
        },
    )
    with serve_in_thread(create_app(Settings(models={"tiny": str(assets.rm)}))) as url:
        cfg.reward.reward_url = [url]
        trainer = Trainer(cfg)
        trainer.setup()
        trainer.train_step()
    try:  # the server is gone now
        with (
            caplog.at_level("INFO", logger="karma.client"),
            pytest.raises(
                RewardUnavailableError, match=r"reward service failed .* checkpoint saved to .*step-000001"
            ),
        ):
            trainer.train_step()
    finally:
        trainer.close()
    waits = [r.getMessage() for r in caplog.records if r.levelname == "INFO" and r.name == "karma.client"]
    assert waits, "nothing logged at INFO while the reward service was down"
    assert re.match(
        rf"reward service: POST /v1/score attempt 1 failed \({url}: ConnectError: .*\); retrying in "
        r"\d+\.\d\ds \(\d+\.\ds elapsed, deadline 2s\)",
        waits[0],
    )


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_trains_from_yaml_plus_flags_on_reddit_prompts(assets, tmp_path):
    from typer.testing import CliRunner

    from karma.cli import app
    from tests.support import write_prepared_data

    data = write_prepared_data(tmp_path / "prep", n_threads=10, comments_per_thread=2)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(tiny_config(assets, tmp_path / "ignored").to_yaml())
    out = tmp_path / "cli-out"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--config",
            str(yaml_file),
            "--steps",
            "1",
            "--output-dir",
            str(out),
            "--algo",
            "grpo",
            "--samples-per-prompt",
            "2",
            "--prompts-per-step",
            "2",
            "--prompts",
            f"reddit:{data}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"completed at step 1: {out}" in result.output
    assert (
        re.search(r"held-out reward \(\d prompts\): base -?\d", result.output)
        and (out / "heldout_reward.json").exists()
    )
    assert (out / "config.json").exists() and len(read_metrics(out)) == 1
    saved = TrainConfig.from_sources(out / "train_config.yaml")
    assert (saved.ppo.algo, saved.run.steps, saved.data.prompts) == ("grpo", 1, f"reddit:{data}")

    bad = CliRunner().invoke(app, ["train", "--config", str(yaml_file), "--algo", "dpo"])
    assert bad.exit_code == 2 and "'dpo' is not one of 'ppo', 'rloo', 'grpo'" in cli_text(bad.output)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--config",
            str(yaml_file),
            "--prompts",
            f"file:{empty}",
            "--output-dir",
            str(tmp_path / "o2"),
        ],
    )
    assert result.exit_code == 1 and f"karma train: PromptSourceError: no prompts in {empty}" in result.output


def test_cli_exits_1_on_a_failed_run_and_leaves_a_failed_result(assets, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from karma.cli import app

    def diverging_update(self, batch):
        self._check_finite({"loss/total": float("nan")}, "epoch 1, minibatch 1")

    monkeypatch.setattr(Trainer, "update", diverging_update)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(tiny_config(assets, tmp_path / "ignored").to_yaml())
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["train", "--config", str(yaml_file), "--steps", "1", "--output-dir", str(out)]
    )
    assert result.exit_code == 1, result.output
    assert (
        "karma train: TrainingDivergedError: non-finite loss/total = nan in the update of step 1 (epoch 1, "
        "minibatch 1) -- training stopped before step 1; checkpoint saved to"
    ) in result.output
    saved = json.loads((out / "trainer_result.json").read_text())
    assert (saved["status"], saved["error_type"], saved["checkpoint"]) == (
        "failed",
        "TrainingDivergedError",
        str(out / "checkpoints" / "step-000000"),
    )


# ----------------------------------------------------------------------------------------------- held-out reward
def test_paired_statistics_of_the_heldout_reward():
    import math

    import numpy as np

    from services.policy_trainer.heldout import paired_mde, paired_summary

    rng = np.random.default_rng(0)
    base = rng.normal(0.0, 1.0, 200)
    diff = rng.normal(0.3, 1.0, 200)
    assert paired_mde(diff) == pytest.approx(
        (1.959964 + 0.841621) * diff.std(ddof=1) / math.sqrt(200), rel=1e-5
    )
    s = paired_summary(base, base + diff, seed=1)
    assert s["delta"] == pytest.approx(diff.mean()) and s["n"] == 200 and s["test"] == "paired permutation"
    assert s["trained_mean"] - s["base_mean"] == pytest.approx(s["delta"])
    assert s["ci_low"] < diff.mean() < s["ci_high"]
    half = 1.96 * diff.std(ddof=1) / math.sqrt(200)  # the bootstrap interval is about the normal one
    assert s["ci_high"] - s["ci_low"] == pytest.approx(2 * half, rel=0.15)
    from statistics import NormalDist

    z = diff.sum() / math.sqrt((diff**2).sum())  # the sign-flip null: var(mean) = sum(d^2) / n^2
    assert s["p"] == pytest.approx(2 * (1 - NormalDist().cdf(z)), abs=0.003) and s["p"] < 0.05
    assert paired_summary(base, base + diff + 0.5, seed=1)["p"] == pytest.approx(
        1 / 10001
    )  # none of 10,000 flips
    x = np.abs(rng.normal(0, 1, 100))
    null = paired_summary(
        base[:200], base[:200] + np.concatenate([x, -x]), seed=1
    )  # mean difference exactly 0
    assert null["p"] == 1.0 and null["ci_low"] < 0 < null["ci_high"]
    assert paired_summary([1.0, 2.0], [1.5, 3.0], seed=0)["p"] >= 0.25  # two pairs cannot be significant
    with pytest.raises(ValueError, match="paired samples differ in size: 2 vs 1"):
        paired_summary([1.0, 2.0], [1.0])


def test_heldout_prompts_are_never_training_prompts(tmp_path):
    from services.policy_trainer.prompts import load_prompt_sets
    from tests.support import write_prepared_data

    lines = [{"prompt": f"prompt {i % 30}"} for i in range(40)]  # 30 distinct texts, 10 repeated
    file = tmp_path / "p.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in lines))
    sets = load_prompt_sets(f"file:{file}", heldout=8, heldout_seed=3)
    held = [r.context for r in sets.heldout]
    assert len(held) == len(set(held)) == 8
    assert not set(held) & {r.context for r in sets.train}  # duplicates of a held-out text left training too
    assert len(sets.train) == 40 - sum(1 for r in lines if r["prompt"] in held)
    assert "held-out slice (8 of 30 distinct prompts, seed 3)" in sets.heldout_source
    assert [r.context for r in load_prompt_sets(f"file:{file}", heldout=8, heldout_seed=3).heldout] == held
    assert [r.context for r in load_prompt_sets(f"file:{file}", heldout=8, heldout_seed=4).heldout] != held
    assert (
        len(load_prompt_sets(f"file:{file}", heldout=500).heldout) == 15
    )  # at most half the distinct prompts
    assert len(load_prompt_sets(f"file:{file}", heldout=8, max_prompts=5).train) == 5
    one = tmp_path / "one.jsonl"
    one.write_text('"only prompt"\n')
    with pytest.raises(PromptSourceError, match="holds 1 distinct prompt.*set heldout_prompts: 0"):
        load_prompt_sets(f"file:{one}", heldout=4)

    data = write_prepared_data(tmp_path / "prep", n_threads=40, comments_per_thread=2)
    sets = load_prompt_sets(f"reddit:{data}", heldout=5, heldout_seed=0)
    val = {r.context for r in load_records(f"reddit:{data}", split="val")}
    assert len(sets.heldout) == 5 and {r.context for r in sets.heldout} <= val
    assert not {r.context for r in sets.heldout} & {r.context for r in sets.train}
    assert sets.heldout[0].metadata["subreddit"] in ("College", "ApplyingToCollege")
    with pytest.raises(ValueError, match="heldout_split must differ from the training split \\('val'\\)"):
        TrainConfig.from_dict(
            {
                "data": {"prompts": f"reddit:{data}", "split": "val"},
                "reward": {"reward_url": ["http://127.0.0.1:9"]},
            }
        )


def test_run_writes_the_heldout_reward_of_base_and_trained_policy(assets, tmp_path):
    """heldout_reward.json equals an independent recomputation: the base policy loaded from its folder, the
    trained one from the run's output, the same generation settings, the RM scored in process."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from karma.rm.model import RewardModel, RMInput
    from services.policy_trainer.heldout import KEYS, generate_replies

    cfg = tiny_config(
        assets,
        tmp_path / "out",
        run={"steps": 2, "save_every": 0},
        eval={"heldout_prompts": 5, "heldout_batch_size": 2, "heldout_seed": 7},
    )
    trainer, result = run(cfg)
    got = json.loads((tmp_path / "out" / "heldout_reward.json").read_text())
    assert tuple(got) == KEYS and result["heldout"] == got
    prompts = [trainer.heldout[i] for i in range(len(trainer.heldout))]
    assert got["n"] == 5 and got["source"] == trainer.heldout_source
    assert not {p.context for p in prompts} & {r.context for r in trainer.prompts.records}

    rm = RewardModel.load(assets.rm)
    tok = trainer.tokenizer
    recomputed = {}
    for name, folder in (("base", assets.policy), ("trained", tmp_path / "out")):
        lm = AutoModelForCausalLM.from_pretrained(folder).eval()
        gens = generate_replies(
            lm,
            tok,
            trainer.eos_ids,
            [p.prompt_ids for p in prompts],
            temperature=1.0,
            max_new_tokens=10,
            batch_size=2,
            seed=7,
        )
        texts = [tok.decode(g.response_ids, skip_special_tokens=True).strip() for g in gens]
        scores = rm.score(
            [RMInput(p.context, t, p.metadata) for p, t in zip(prompts, texts, strict=True)], normalize=True
        )
        recomputed[name] = (lm, gens, texts, scores)
    assert got["base_mean"] == pytest.approx(np.mean(recomputed["base"][3]), abs=1e-5)
    assert got["trained_mean"] == pytest.approx(np.mean(recomputed["trained"][3]), abs=1e-5)
    assert got["delta"] == pytest.approx(got["trained_mean"] - got["base_mean"], abs=1e-9)
    assert recomputed["base"][2] != recomputed["trained"][2]  # the two policies really differ
    for name in ("base", "trained"):
        _, gens, texts, _ = recomputed[name]
        assert got[f"{name}_eos_rate"] == pytest.approx(np.mean([g.ended_with_eos for g in gens]))
        assert got[f"{name}_mean_words"] == pytest.approx(np.mean([len(t.split()) for t in texts]))

    def seq_logprob(lm, prompt, response):  # one unpadded sequence, at temperature 1
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = lm(ids).logits[0, len(prompt) - 1 : -1].float()
        return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).sum())

    base_lm, trained_lm = recomputed["base"][0], recomputed["trained"][0]
    kl = [
        seq_logprob(trained_lm, p.prompt_ids, g.response_ids)
        - seq_logprob(base_lm, p.prompt_ids, g.response_ids)
        for p, g in zip(prompts, recomputed["trained"][1], strict=True)
    ]
    assert got["kl_mean"] == pytest.approx(np.mean(kl), abs=1e-3) and got["kl_mean"] != 0
    assert 0 <= got["p"] <= 1 and got["ci_low"] <= got["delta"] <= got["ci_high"] and got["mde"] > 0
    # one reply per prompt: the reward's spread is across prompts only
    assert got["samples_per_prompt"] == 1
    for name in ("base", "trained"):
        assert got[f"{name}_within_prompt_sd"] is None
        assert got[f"{name}_across_prompt_sd"] == pytest.approx(np.std(recomputed[name][3], ddof=1), abs=1e-5)


def test_heldout_samples_give_k_row_seeded_replies_per_prompt_and_the_reward_spread(assets, tmp_path):
    """eval.heldout_samples = 2: reply j of prompt i is row 2i + j (its own seed) for base and trained alike;
    the paired test compares per-prompt means (n = prompts); the within- and across-prompt sd of the scores
    equal a recomputation from the replies regenerated outside the run and scored by the RM in process. The
    training steps (grpo, 2 samples per prompt) log the same spread of their own batch."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from karma.rm.model import RewardModel, RMInput
    from services.policy_trainer.heldout import BASE_FILE, KEYS, generate_replies

    out = tmp_path / "out"
    cfg = tiny_config(
        assets,
        out,
        ppo={"algo": "grpo", "samples_per_prompt": 2, "prompts_per_step": 2},
        run={"steps": 1, "save_every": 0},
        eval={"heldout_prompts": 3, "heldout_batch_size": 4, "heldout_seed": 5, "heldout_samples": 2},
    )
    trainer, result = run(cfg)
    got = json.loads((out / "heldout_reward.json").read_text())
    assert tuple(got) == KEYS and result["heldout"] == got
    assert (got["n"], got["samples_per_prompt"]) == (3, 2)
    saved = json.loads((out / BASE_FILE).read_text())
    assert (saved["n"], saved["samples_per_prompt"], len(saved["replies"])) == (3, 2, 6)

    prompts = [trainer.heldout[i] for i in range(3)]
    rows = [p for p in prompts for _ in range(2)]
    rm, tok = RewardModel.load(assets.rm), trainer.tokenizer
    for name, folder in (("base", assets.policy), ("trained", out)):
        lm = AutoModelForCausalLM.from_pretrained(folder).eval()
        gens = generate_replies(
            lm,
            tok,
            trainer.eos_ids,
            [p.prompt_ids for p in rows],
            temperature=1.0,
            max_new_tokens=10,
            batch_size=4,
            seed=5,
        )
        if name == "base":
            assert [g.response_ids for g in gens] == [r["ids"] for r in saved["replies"]]
        texts = [tok.decode(g.response_ids, skip_special_tokens=True).strip() for g in gens]
        assert any(texts[2 * i] != texts[2 * i + 1] for i in range(3))  # the 2 replies have their own seeds
        scores = np.asarray(
            rm.score(
                [RMInput(p.context, t, p.metadata) for p, t in zip(rows, texts, strict=True)], normalize=True
            )
        ).reshape(3, 2)
        assert got[f"{name}_mean"] == pytest.approx(scores.mean(1).mean(), abs=1e-5)
        assert got[f"{name}_across_prompt_sd"] == pytest.approx(scores.mean(1).std(ddof=1), abs=1e-5)
        assert got[f"{name}_within_prompt_sd"] == pytest.approx(scores.std(1, ddof=1).mean(), abs=1e-5)
        assert got[f"{name}_within_prompt_sd"] > 0
    assert got["delta"] == pytest.approx(got["trained_mean"] - got["base_mean"], abs=1e-9)

    (row,) = read_metrics(out)
    for prefix in ("reward/", "reward/used_"):
        assert row[f"{prefix}within_prompt_sd"] >= 0 and row[f"{prefix}across_prompt_sd"] >= 0
    # no missing-EOS penalty, no clip: the scores the update uses are the scores as returned
    assert row["reward/used_within_prompt_sd"] == row["reward/within_prompt_sd"]
    assert row["reward/used_across_prompt_sd"] == row["reward/across_prompt_sd"]


def test_compute_advantages_logs_the_reward_spread_as_returned_and_as_used():
    """2 prompts x 2 samples, prompt-major. Raw scores [1, 3 | 0, 0.5]; the second reply has no EOS: penalty 1
    -> [1, 2 | 0, 0.5], clip 1.5 -> [1, 1.5 | 0, 0.5]. For 2 samples sd = |a - b| / √2. Tolerance 1e-12: O(1)
    values, a few float64 operations."""
    import math

    from services.policy_trainer.config import PPOConfig
    from services.policy_trainer.experience import RolloutBatch, compute_advantages

    B, T = 4, 3
    zeros = torch.zeros(B, T, dtype=torch.float64)
    batch = RolloutBatch(
        prompt_index=[0, 0, 1, 1],
        contexts=["a"] * B,
        responses=["r"] * B,
        input_ids=torch.zeros(B, T + 1, dtype=torch.long),
        attention_mask=torch.ones(B, T + 1, dtype=torch.long),
        response_mask=torch.ones(B, T, dtype=torch.float64),
        prompt_len=1,
        ended_with_eos=torch.tensor([True, False, True, True]),
        pending=[],
        scores=torch.tensor([1.0, 3.0, 0.0, 0.5], dtype=torch.float64),
        old_logprobs=zeros,
        ref_logprobs=zeros,
    )
    p = PPOConfig(
        algo="grpo",
        samples_per_prompt=2,
        prompts_per_step=2,
        mini_batch_size=4,
        missing_eos_penalty=1.0,
        score_clip=1.5,
    )
    _, _, m = compute_advantages(batch, p, kl_coef=0.0)
    r2 = math.sqrt(2)
    assert m["reward/within_prompt_sd"] == pytest.approx((2 / r2 + 0.5 / r2) / 2, abs=1e-12)
    assert m["reward/across_prompt_sd"] == pytest.approx((2 - 0.25) / r2, abs=1e-12)  # means 2, 0.25
    assert m["reward/used_within_prompt_sd"] == pytest.approx(0.5 / r2, abs=1e-12)
    assert m["reward/used_across_prompt_sd"] == pytest.approx((1.25 - 0.25) / r2, abs=1e-12)
    assert m["reward/penalized_mean"] == pytest.approx((1 + 1.5 + 0 + 0.5) / 4, abs=1e-12)


def test_heldout_reward_can_be_turned_off(assets, tmp_path):
    _, result = run(
        tiny_config(assets, tmp_path / "out", run={"steps": 1, "save_every": 0}, eval={"heldout_prompts": 0})
    )
    assert "heldout" not in result and not (tmp_path / "out" / "heldout_reward.json").exists()


# ----------------------------------------------------------------------------------------------- reward hacking
def test_the_monitor_alarm_fires_when_a_rule_reward_is_hacked(assets, tmp_path):
    """A reward that pays for length alone (a length window far above what 10 tokens reach): its reward is a
    linear function of the reply's words, so |corr(reward, length)| = 1 every step. The length-correlation
    alarm warns after `alarm_corr_steps` steps, and with `alarm_stop` stops the run with a checkpoint."""
    from karma.rm.rule import RuleSpec, write_rule_folder
    from services.policy_trainer.monitor import RewardHackingError, RewardHackingWarning

    rule = write_rule_folder(
        RuleSpec.parse({"rules": [{"kind": "length_window", "min_words": 500, "max_words": 600}]}),
        tmp_path / "longer_is_better",
    )
    alarm = {"alarm_length_corr": 0.95, "alarm_corr_steps": 2, "alarm_distinct2_drop": None}
    cfg = tiny_config(
        assets,
        tmp_path / "warn",
        reward={"reward_model": str(rule), "reward_normalize": False},
        run={"steps": 3, "save_every": 0},
        eval={"heldout_prompts": 0},
        monitor=alarm,
    )
    with pytest.warns(RewardHackingWarning, match="length_correlation"):
        _, result = run(cfg)
    rows = read_metrics(tmp_path / "warn")
    assert result["status"] == "completed"
    assert [r["monitor/reward_length_corr"] for r in rows] == pytest.approx([1.0, 1.0, 1.0])
    assert [r["monitor/alarms"] for r in rows] == [0.0, 1.0, 1.0]

    cfg = tiny_config(
        assets,
        tmp_path / "stop",
        reward={"reward_model": str(rule), "reward_normalize": False},
        run={"steps": 3, "save_every": 0},
        eval={"heldout_prompts": 0},
        monitor=alarm | {"alarm_stop": True},
    )
    with pytest.raises(RewardHackingError, match="training stopped before step 2; checkpoint saved to"):
        run(cfg)
    result = json.loads((tmp_path / "stop" / "trainer_result.json").read_text())
    assert result["status"] == "failed" and result["error_type"] == "RewardHackingError"
    assert result["checkpoint"] and result["step"] == 1


def test_heldout_base_replies_come_from_the_rollout_engine_before_the_first_update(assets, whole_run, caplog):
    """The base replies are generated by the run's rollout engine at step 0 and kept in heldout_base.json; they
    are exactly the replies the reference module gives with the same row seeds (the engine held the base
    weights then), so the paired comparison is base vs trained on the same prompts and seeds."""
    from services.policy_trainer.heldout import BASE_FILE, generate_replies, prepare_base_replies

    saved = json.loads((whole_run.out / BASE_FILE).read_text())
    assert (saved["n"], saved["engine"], len(saved["replies"])) == (4, "hf", 4)
    assert json.loads((whole_run.out / "heldout_reward.json").read_text())["n"] == 4
    cfg = tiny_config(assets, whole_run.out, run={"resume": True})
    trainer = Trainer(cfg, reward_source=LocalRewardSource(whole_run.rm))
    try:
        trainer.setup()
        assert trainer.step == 4  # resumed past the first update: the saved replies are read, not regenerated
        with caplog.at_level("INFO", logger="services.policy_trainer.heldout"):
            base = prepare_base_replies(trainer)
        assert not [r for r in caplog.records if "held-out replies" in r.getMessage()]
        assert [g.response_ids for g in base] == [r["ids"] for r in saved["replies"]]
        ev = cfg.eval
        with trainer.policy.reference_lm() as ref_lm:
            again = generate_replies(
                ref_lm,
                trainer.tokenizer,
                trainer.eos_ids,
                [trainer.heldout[i].prompt_ids for i in range(4)],
                temperature=cfg.rollout.temperature
                if ev.heldout_temperature is None
                else ev.heldout_temperature,
                max_new_tokens=ev.heldout_max_new_tokens or cfg.rollout.max_new_tokens,
                batch_size=ev.heldout_batch_size,
                seed=ev.heldout_seed,
            )
        assert [g.response_ids for g in again] == [g.response_ids for g in base]
        trainer.step = 1  # other settings: not used; past step 0: not regenerated either
        trainer.cfg.eval.heldout_seed = 99
        assert prepare_base_replies(trainer) is None
    finally:
        trainer.close()
