"""One step's experience (`RolloutBatch`) and the functions that turn it into advantages and losses.

The trainer's phases fill a `RolloutBatch` in order: rollout (`generate_batch`: ids, masks, pending reward
futures), logprobs (`score_logprobs`: old / reference log-probs, values), reward_wait (`collect_scores`),
advantages (`compute_advantages`), update (`micro_batch_loss` per micro-batch). The math itself is `ppo_math`; here it is assembled per algorithm.
"""

from __future__ import annotations

import concurrent.futures
import math
from dataclasses import dataclass
from typing import Any

import torch

from services.policy_trainer import ppo_math as pm
from services.policy_trainer.config import PPOConfig
from services.policy_trainer.engines import Generation, RolloutEngine
from services.policy_trainer.policy import Forward, Policy, pack_sequences
from services.policy_trainer.prompts import PromptPool
from services.policy_trainer.rewards import RewardDispatcher, RewardUnavailableError


@dataclass
class RolloutBatch:
    """One step's experience. B responses, P = padded prompt length, T = padded response length."""

    prompt_index: list[int]  # B, index into the trainer's prompt list
    contexts: list[str]  # B, reward-model contexts
    responses: list[str]  # B, decoded response text
    input_ids: torch.Tensor  # (B, P + T) left-padded prompt | right-padded response
    attention_mask: torch.Tensor  # (B, P + T)
    response_mask: torch.Tensor  # (B, T) float, 1 on response tokens (EOS included)
    prompt_len: int  # P
    ended_with_eos: torch.Tensor  # (B,) bool
    pending: list[tuple[list[int], Any]]  # (rows, future of their scores)
    scores: torch.Tensor | None = None  # (B,) reward-model scores as returned
    old_logprobs: torch.Tensor | None = None  # (B, T)
    ref_logprobs: torch.Tensor | None = None  # (B, T)
    values: torch.Tensor | None = None  # (B, T), ppo only
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None  # (B, T), ppo only

    @property
    def size(self) -> int:
        return len(self.prompt_index)


def generate_batch(
    engine: RolloutEngine,
    tokenizer,
    prompts: PromptPool,
    rows: list[int],
    rewards: RewardDispatcher,
    *,
    seed: int,
    max_new_tokens: int,
    temperature: float,
) -> RolloutBatch:
    """Responses to `prompts[r]` for r in `rows`; each finished response's reward is requested at once (its
    future goes to `pending`), so the rewards are computed while the trainer goes on."""
    pending: list[tuple[list[int], Any]] = []
    texts: dict[int, str] = {}

    def on_finished(gens: list[Generation]) -> None:
        idx = [g.index for g in gens]
        for g in gens:
            texts[g.index] = tokenizer.decode(g.response_ids, skip_special_tokens=True).strip()
        future = rewards.submit([prompts[rows[i]].score_item(texts[i]) for i in idx])
        pending.append((idx, future))

    gens = engine.generate(
        [prompts[r].prompt_ids for r in rows],
        seed=seed,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        on_finished=on_finished,
    )
    packed = pack_sequences(
        [prompts[r].prompt_ids for r in rows], [g.response_ids for g in gens], tokenizer.pad_token_id
    )
    return RolloutBatch(
        prompt_index=rows,
        contexts=[prompts[r].context for r in rows],
        responses=[texts[i] for i in range(len(rows))],
        input_ids=packed.input_ids,
        attention_mask=packed.attention_mask,
        response_mask=packed.response_mask,
        prompt_len=packed.prompt_len,
        ended_with_eos=torch.tensor([g.ended_with_eos for g in gens]),
        pending=pending,
    )


@torch.no_grad()
def score_logprobs(policy: Policy, batch: RolloutBatch, temperature: float, micro_batch_size: int) -> None:
    """Fill the batch's old log-probs and values (current policy) and reference log-probs, micro-batched."""
    old, ref, values = [], [], []
    T, k = temperature, micro_batch_size
    for s in range(0, batch.size, k):
        ids, att = batch.input_ids[s : s + k], batch.attention_mask[s : s + k]
        f = policy.forward_responses(ids, att, batch.prompt_len, T, with_entropy=False)
        old.append(f.logprobs)
        if f.values is not None:
            values.append(f.values.float())
        ref.append(policy.forward_responses(ids, att, batch.prompt_len, T, reference=True).logprobs)
    m = batch.response_mask
    batch.old_logprobs = torch.cat(old) * m
    batch.ref_logprobs = torch.cat(ref) * m
    batch.values = torch.cat(values) * m if values else None


def collect_scores(pending: list[tuple[list[int], Any]], size: int, timeout_s: float) -> torch.Tensor:
    """(size,) scores from the pending reward futures; `RewardUnavailableError` when one does not answer within
    `timeout_s` or a score is missing / non-finite."""
    scores = [math.nan] * size
    for idx, future in pending:
        try:
            got = future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            raise RewardUnavailableError(f"no reward within {timeout_s:.0f}s") from None
        for i, s in zip(idx, got, strict=True):
            scores[i] = s
    if any(math.isnan(s) or math.isinf(s) for s in scores):
        raise RewardUnavailableError(f"the reward source returned no/non-finite scores: {scores}")
    return torch.tensor(scores, dtype=torch.float32)


@torch.no_grad()
def compute_advantages(
    batch: RolloutBatch, p: PPOConfig, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """(advantages (B, T), returns (B, T) for ppo else None, metrics) of a batch with scores, old / reference
    log-probs (and values for ppo). `metrics["objective/kl"]` is the mean sequence KL (k1) for the controller."""
    mask = batch.response_mask
    scores = batch.scores.clone()
    penalized = ~batch.ended_with_eos if p.missing_eos_penalty else torch.zeros_like(batch.ended_with_eos)
    scores[penalized] -= p.missing_eos_penalty or 0.0
    if p.score_clip is not None:
        scores = scores.clamp(-p.score_clip, p.score_clip)
    kl = pm.kl_penalty(batch.old_logprobs, batch.ref_logprobs, p.kl_estimator) * mask
    seq_kl = ((batch.old_logprobs - batch.ref_logprobs) * mask).sum(1)  # k1, for logging and the controller
    metrics: dict[str, float] = {}
    ret = None
    if p.algo == "ppo":
        rewards = pm.token_rewards(scores, kl, mask, kl_coef)
        if p.whiten_rewards:
            rewards = pm.masked_whiten(rewards, mask, shift_mean=False)
        adv, ret = pm.compute_gae(rewards, batch.values, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            adv = pm.masked_whiten(adv, mask)
        metrics["objective/non_score_reward"] = float((-kl_coef * kl).sum(1).mean())
        metrics["value/mean"] = float(pm.masked_mean(batch.values, mask))
        metrics["value/explained_variance"] = pm.explained_variance(batch.values, ret, mask)
    elif p.algo == "rloo":
        seq_reward = scores - kl_coef * kl.sum(1)
        adv = pm.rloo_advantages(seq_reward, p.samples_per_prompt)[:, None] * mask
        metrics["objective/non_score_reward"] = float((-kl_coef * kl.sum(1)).mean())
    else:  # grpo: KL enters the loss, not the reward
        adv = pm.grpo_advantages(scores, p.samples_per_prompt)[:, None] * mask
    lengths = mask.sum(1)
    raw = batch.scores
    metrics |= {
        "reward/mean": float(raw.mean()),
        "reward/std": float(raw.std()) if batch.size > 1 else 0.0,
        "reward/min": float(raw.min()),
        "reward/max": float(raw.max()),
        "reward/penalized_mean": float(scores.mean()),
        "reward/missing_eos_penalty_frac": float(penalized.float().mean()),
        "objective/kl": float(seq_kl.mean()),
        "objective/kl_coef": kl_coef,
        "advantages/mean": float(pm.masked_mean(adv, mask)),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/eos_frac": float(batch.ended_with_eos.float().mean()),
    }
    return adv, ret, metrics


def micro_batch_loss(
    f: Forward, batch: RolloutBatch, idx: torch.Tensor, p: PPOConfig, kl_coef: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of micro-batch `idx` given the current policy's forward `f` on it, and its statistics:
    clipped policy loss - ent_coef x entropy, + vf_coef x clipped value loss (ppo) or + kl_coef x k3 KL (grpo)."""
    mask = batch.response_mask[idx]
    pg_loss, clipfrac, approx_kl = pm.policy_loss(
        f.logprobs, batch.old_logprobs[idx], batch.advantages[idx], mask, p.cliprange
    )
    entropy = pm.masked_mean(f.entropy, mask)
    loss = pg_loss - p.ent_coef * entropy
    stats = {
        "loss/policy": pg_loss.item(),
        "policy/clipfrac": float(clipfrac),
        "policy/approx_kl": float(approx_kl),
        "objective/entropy": entropy.item(),
    }
    if p.algo == "ppo":
        v_loss, v_clipfrac = pm.value_loss(
            f.values.float(), batch.values[idx], batch.returns[idx], mask, p.cliprange_value
        )
        loss = loss + p.vf_coef * v_loss
        stats |= {"loss/value": v_loss.item(), "value/clipfrac": float(v_clipfrac)}
    elif p.algo == "grpo":
        kl_loss = pm.masked_mean(pm.kl_penalty(f.logprobs, batch.ref_logprobs[idx], "k3"), mask)
        loss = loss + kl_coef * kl_loss
        stats["loss/kl"] = kl_loss.item()
    return loss, stats
