"""One step's experience (`RolloutBatch`) and the functions that turn it into advantages and losses.

The trainer's phases fill a `RolloutBatch` in order: rollout (`generate_batch`: ids, masks, pending reward
futures), logprobs (`score_logprobs`: old / reference log-probs, values), reward_wait (`collect_scores`),
advantages (`compute_advantages`), update (`update_policy`: `micro_batch_loss` per micro-batch). The math
itself is `ppo_math`; here it is assembled per algorithm.

Data-parallel (see `distributed`): `generate_batch` rolls out this rank's share of the step's rows, padded to
the step's global widths, and `gather_batch` (the gather phase, after the rewards) joins the ranks' shares in
rank order, so every rank holds the batch one process would have.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Any

import torch

from services.policy_trainer import ppo_math as pm
from services.policy_trainer.config import PPOConfig
from services.policy_trainer.distributed import Distributed, merge_stats
from services.policy_trainer.engines import Generation, RolloutEngine
from services.policy_trainer.policy import Forward, Policy, pack_sequences
from services.policy_trainer.prompts import PromptPool
from services.policy_trainer.rewards import RewardDispatcher, RewardUnavailableError


class TrainingDivergedError(RuntimeError):
    """A loss, PPO statistic or the gradient norm of an update was NaN or infinite: the run stops before that
    gradient is applied. `values` maps each non-finite quantity to its value; `step` is the failing step."""

    def __init__(self, message: str, *, step: int, values: dict[str, float]):
        super().__init__(message)
        self.step = step
        self.values = values


def check_finite(values: dict[str, float], step: int, where: str) -> None:
    """Raise `TrainingDivergedError` naming every NaN / infinite value (before its gradient is applied)."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        named = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise TrainingDivergedError(
            f"non-finite {named} in the update of step {step} ({where})", step=step, values=bad
        )


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

    def to(self, device: torch.device) -> RolloutBatch:
        """The batch with its tensors on `device` (itself, unchanged, when they are there already)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                setattr(self, f.name, value.to(device))
        return self


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
    dist: Distributed | None = None,
) -> RolloutBatch:
    """Responses to `prompts[r]` for r in `rows`; each finished response's reward is requested at once (its
    future goes to `pending`), so the rewards are computed while the trainer goes on. In the data-parallel
    layout (`dist.parallel_layout`) only this rank's contiguous share of `rows`, each row sampled from its
    own seed, padded to the widest prompt and (over all ranks) the longest response of the step."""
    row_ids = prompt_width = None
    if dist is not None and dist.parallel_layout:
        start, stop = dist.shard(len(rows))
        prompt_width = max(len(prompts[r].prompt_ids) for r in rows)
        rows, row_ids = rows[start:stop], list(range(start, stop))
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
        row_ids=row_ids,
        prompt_width=prompt_width,
    )
    response_width = None
    if row_ids is not None:
        longest = max(max(len(g.response_ids) for g in gens), 1)
        response_width = dist.max_int(longest, "the step's longest response (all-reduce)")
    packed = pack_sequences(
        [prompts[r].prompt_ids for r in rows],
        [g.response_ids for g in gens],
        tokenizer.pad_token_id,
        prompt_width=prompt_width,
        response_width=response_width,
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
    """(size,) float64 scores from the pending reward futures; `RewardUnavailableError` when one does not answer within
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
    return torch.tensor(scores, dtype=torch.float64)


def gather_batch(batch: RolloutBatch, dist: Distributed, failure: str | None = None) -> RolloutBatch:
    """The step's whole batch on every rank: the ranks' shares (scored, with old / reference log-probs and
    values) joined in rank order. `failure`: this rank's reward failure; when any rank had one, every rank
    raises `RewardUnavailableError` naming it (so all of them stop at the same point)."""
    lists = dist.gather_objects(
        (failure, batch.prompt_index, batch.contexts, batch.responses), "gathering the step's experience"
    )
    failed = [(r, f) for r, (f, *_) in enumerate(lists) if f is not None]
    if failed:
        raise RewardUnavailableError("; ".join(f"rank {r}: {f}" for r, f in failed))
    batch.scores = batch.scores.to(dist.device)
    tensors = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f.name] = dist.gather_rows(value, f"gathering the step's {f.name}")
    _, rows, contexts, responses = zip(*lists, strict=True)  # per rank, in rank order
    return RolloutBatch(
        prompt_index=[i for part in rows for i in part],
        contexts=[c for part in contexts for c in part],
        responses=[r for part in responses for r in part],
        prompt_len=batch.prompt_len,  # the step's global prompt width on every rank
        pending=[],
        **tensors,
    )


def wait_for_scores(batch: RolloutBatch, timeout_s: float, *, defer: bool = False) -> str | None:
    """Fill `batch.scores` (`collect_scores`, on the batch's device). `defer` (several ranks): a
    `RewardUnavailableError` is returned as its message instead of raised, for `gather_batch` to raise on
    every rank."""
    try:
        scores = collect_scores(batch.pending, batch.size, timeout_s)
        # in the log-probs' dtype when that is float64 (numerical checks), else float32
        dtype = torch.float64 if batch.old_logprobs.dtype == torch.float64 else torch.float32
        batch.scores = scores.to(batch.input_ids.device, dtype)
    except RewardUnavailableError as exc:
        if not defer:
            raise
        return str(exc)
    return None


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
    # the reward's spread over the policy's own samples (its teaching signal), as returned and as used
    for prefix, s in (("reward/", raw), ("reward/used_", scores)):
        metrics |= {f"{prefix}{k}": v for k, v in pm.reward_spread(s, p.samples_per_prompt).items()}
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


def update_policy(
    model: torch.nn.Module,
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: RolloutBatch,
    p: PPOConfig,
    *,
    kl_coef: float,
    temperature: float,
    seed: int,
    step: int,
    dist: Distributed,
) -> dict[str, float]:
    """The update phase of step `step`: `epochs` passes over the batch in an order drawn from `seed`; each
    minibatch is one optimizer step over micro-batches (gradient accumulation). `model` is the policy or its
    DDP wrapper: with several ranks each trains on its share of every minibatch and DDP averages the
    gradients. A NaN / infinite statistic or gradient norm raises `TrainingDivergedError` before that
    gradient is applied (on every rank: the ranks agree first). Returns the statistics averaged over all
    micro-batches (of all ranks) and the mean gradient norm."""
    sums: dict[str, float] = defaultdict(float)
    n_micro, grad_norms = 0, []
    gen = torch.Generator().manual_seed(seed)
    accum = p.grad_accum_steps // dist.world_size  # this rank's micro-batches per minibatch
    lo, hi = dist.shard(p.mini_batch_size)
    policy.train()
    try:
        for epoch in range(p.epochs):
            perm = torch.randperm(batch.size, generator=gen)
            for n_mb, start in enumerate(range(0, batch.size, p.mini_batch_size)):
                where = f"epoch {epoch + 1}, minibatch {n_mb + 1}"
                mb = perm[start : start + p.mini_batch_size][lo:hi]
                optimizer.zero_grad(set_to_none=True)
                diverged = None
                for m0 in range(0, len(mb), p.micro_batch_size):
                    idx = mb[m0 : m0 + p.micro_batch_size]
                    with dist.micro_step(model, sync=m0 + p.micro_batch_size >= len(mb)):
                        f = model(
                            *(batch.input_ids[idx], batch.attention_mask[idx], batch.prompt_len, temperature),
                            with_values=p.algo == "ppo",
                        )
                        loss, stats = micro_batch_loss(f, batch, idx, p, kl_coef)
                        (loss / accum).backward()
                    stats["loss/total"] = loss.item()
                    try:
                        check_finite(stats, step, where)
                    except TrainingDivergedError as exc:
                        if not dist.enabled:
                            raise
                        diverged = diverged or exc  # raised once the ranks agree
                    for k, v in stats.items():
                        sums[k] += v
                    n_micro += 1
                if dist.any(diverged is not None, "agreeing that the update's statistics are finite"):
                    raise diverged or TrainingDivergedError(
                        f"non-finite statistics on another rank in the update of step {step} ({where})",
                        step=step,
                        values={},
                    )
                grad_norm = float(
                    torch.nn.utils.clip_grad_norm_(
                        [q for _, q in policy.trainable_named_parameters()], p.max_grad_norm
                    )
                )
                check_finite({"policy/grad_norm": grad_norm}, step, where)  # the same on every rank
                grad_norms.append(grad_norm)
                optimizer.step()
                scheduler.step()
    finally:
        policy.eval()
    sums, n_micro = merge_stats(dist.gather_objects((dict(sums), n_micro), "the update's statistics"))
    return {k: v / n_micro for k, v in sums.items()} | {"policy/grad_norm": sum(grad_norms) / len(grad_norms)}
