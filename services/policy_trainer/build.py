"""What `Trainer.setup` builds from the config besides the policy: the reward source, the tokenizer and the
prompts, the policy's EOS ids, the vLLM engine, the optimizer with its LR schedule (transformers'
`get_scheduler`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch

from services.policy_trainer.config import PPOConfig, RewardConfig, TrainConfig
from services.policy_trainer.engines import RolloutEngine
from services.policy_trainer.prompts import PromptPool, build_prompts, load_prompt_sets
from services.policy_trainer.rewards import HTTPRewardSource, LocalRewardSource, RewardSource

log = logging.getLogger(__name__)


def build_reward_source(r: RewardConfig, dtype: str = "float32") -> RewardSource:
    """The reward service over HTTP when `reward_url` is set, else the reward model in process (in float64
    when the policy trains in float64, else float32)."""
    if r.reward_url:
        return HTTPRewardSource(
            r.reward_url,
            api_key=r.reward_api_key,
            model=r.reward_model_name,
            normalize=r.reward_normalize,
            timeout_s=r.reward_timeout_s,
            deadline_s=r.reward_deadline_s,
        )
    rm_dtype = "float64" if dtype == "float64" else None
    return LocalRewardSource.load(r.reward_model, normalize=r.reward_normalize, dtype=rm_dtype)


def load_tokenizer(policy_path: str):
    """The policy's tokenizer; without a pad token, EOS pads."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_prompts(cfg: TrainConfig, tokenizer) -> tuple[PromptPool, PromptPool, str]:
    """(training prompts, held-out prompts, description of the held-out source); prompts are rendered for
    `tokenizer` when first drawn. `PromptSourceError` on a source that cannot be read or holds no prompts."""
    t0 = time.perf_counter()
    d = cfg.data
    sets = load_prompt_sets(
        d.prompts,
        split=d.split,
        prompt_field=d.prompt_field,
        max_prompts=d.max_prompts,
        heldout=cfg.eval.heldout_prompts,
        heldout_split=cfg.eval.heldout_split,
        heldout_seed=cfg.eval.heldout_seed,
    )
    render = {"system_prompt": d.system_prompt, "max_length": d.max_prompt_length}
    train, heldout = (
        build_prompts(sets.train, tokenizer, **render),
        build_prompts(sets.heldout, tokenizer, **render),
    )
    log.info(
        "prompts: %d for training, %d held out (%.1fs)", len(train), len(heldout), time.perf_counter() - t0
    )
    return train, heldout, sets.heldout_source


def policy_eos_ids(tokenizer, policy_path: str) -> set[int]:
    """The tokenizer's EOS id and those of the policy's generation config; `ValueError` when there is none."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        gen_eos = GenerationConfig.from_pretrained(policy_path).eos_token_id
    except OSError:
        gen_eos = None
    if gen_eos is not None:
        ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    if not ids:
        raise ValueError(f"policy {policy_path} defines no EOS token")
    return ids


def start_vllm(cfg: TrainConfig, policy_path: str, eos_ids: set[int]) -> RolloutEngine:
    """The vLLM engine of `engine: vllm` (it seeds the global RNGs when it starts: start it before seeding)."""
    from services.policy_trainer.engines import VLLMEngine

    return VLLMEngine(
        policy_path,
        dtype=cfg.model.dtype,
        seed=cfg.run.seed,
        eos_ids=eos_ids,
        max_model_len=cfg.data.max_prompt_length + cfg.rollout.max_new_tokens,
        kv_cache_gib=cfg.rollout.vllm_kv_cache_gib,
        gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
        enforce_eager=cfg.rollout.vllm_enforce_eager,
        max_num_seqs=cfg.rollout.vllm_max_num_seqs,
    )


def optimizer_and_schedule(
    params: Iterable[torch.nn.Parameter], p: PPOConfig, steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and transformers' `get_scheduler(p.lr_scheduler)` over all `steps x optimizer_steps_per_step`
    optimizer steps, after `warmup_steps` of linear warm-up (transformers' convention: from 0, so the first
    optimizer step of a warm-up has learning rate 0). Both states are checkpointed: resume is exact."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=p.learning_rate, weight_decay=p.weight_decay)
    # transformers' "constant" ignores warm-up; "constant_with_warmup" with 0 warm-up steps is constant
    name = "constant_with_warmup" if p.lr_scheduler == "constant" else p.lr_scheduler
    scheduler = get_scheduler(
        name,
        optimizer,
        num_warmup_steps=p.warmup_steps,
        num_training_steps=max(steps * p.optimizer_steps_per_step, 1),
    )
    return optimizer, scheduler
