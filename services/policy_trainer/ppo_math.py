"""The math of PPO, RLOO and GRPO as pure functions on tensors (no models, no I/O).

Shapes: `B` sequences, `T` response tokens (right-padded). `mask` is 1.0 on real response tokens (up to and
including the EOS token) and 0.0 on padding. Every function here is deterministic and side-effect free, so
each is unit-tested against a hand computation or a reference loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------------------- masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1 (over all positions if `dim` is None)."""
    if dim is None:
        return masked_sum(x, mask) / mask.sum().clamp(min=1.0)
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries; Bessel-corrected when `unbiased` and more than one entry."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over the masked entries; `shift_mean=False` keeps the mean (scales only).

    Positions outside the mask are returned as 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over masked tokens; NaN when the returns do not vary."""
    var_ret = masked_var(returns, mask)
    if var_ret.item() == 0:
        return math.nan
    return float(1 - masked_var(returns - values, mask) / var_ret)


# ----------------------------------------------------------------------------------------- log-probs, entropy


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under softmax(logits). logits (B, T, V), tokens (B, T) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position. (B, T, V) -> (B, T)."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


# ----------------------------------------------------------------------------------------- KL penalty


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of the sampled tokens. (B, T) -> (B, T).

    - `k1`: log pi - log pi_ref (unbiased, can be negative per token);
    - `k3`: exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 (unbiased, always >= 0; Schulman 2020);
    - `abs`: |k1|; `mse`: 0.5 * k1**2.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    if estimator == "abs":
        return log_ratio.abs()
    if estimator == "mse":
        return 0.5 * log_ratio**2
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of k1, k3, abs, mse")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """PPO's per-token reward: -kl_coef * KL on every response token, plus the sequence score on its last token.

    scores (B,), kl (B, T), mask (B, T) -> rewards (B, T), zero outside the mask.
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)  # index of the last real token (responses are right-padded)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask


# ----------------------------------------------------------------------------------------- advantages


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}; the value after the last
    real token is 0 (the episode ends there). rewards, values, mask (B, T) -> advantages, returns (B, T),
    with returns = advantages + values; both zero outside the mask.
    """
    values = values * mask
    rewards = rewards * mask
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        if t + 1 < T:
            next_values, next_mask = values[:, t + 1], mask[:, t + 1]
        else:
            next_values = next_mask = torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * next_mask * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out: each sample's reward minus the mean of the other k-1 samples of its prompt.

    rewards (B,) ordered prompt-major (the k samples of a prompt are consecutive), B divisible by k -> (B,).
    """
    if k < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    r = rewards.view(-1, k)
    baseline = (r.sum(1, keepdim=True) - r) / (k - 1)
    return (r - baseline).reshape(-1)


def grpo_advantages(rewards: torch.Tensor, k: int, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """GRPO: reward minus its group mean, divided by the group's (unbiased) std unless `scale=False`.

    rewards (B,) prompt-major as in `rloo_advantages` -> (B,).
    """
    if k < 2:
        raise ValueError("GRPO needs at least 2 samples per prompt")
    r = rewards.view(-1, k)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True) + eps)
    return adv.reshape(-1)


def reward_spread(scores: torch.Tensor, k: int) -> dict[str, float]:
    """How much a reward varies over a batch of samples: within a prompt and across prompts.

    scores (B,) ordered prompt-major as in `rloo_advantages` (the k samples of a prompt are consecutive), B
    divisible by k. Returns
    - `within_prompt_sd`: the mean over the B / k prompts of the sd (ddof = 1) of that prompt's k scores, only
      when k >= 2 (the spread the policy can learn from: which of its own replies to a prompt is better);
    - `across_prompt_sd`: the sd (ddof = 1) of the B / k per-prompt mean scores, only when there are >= 2
      prompts (the spread that comes from the prompts, not from the policy's choices).
    A key is left out where it is undefined. Computed in float64 whatever the input dtype.
    """
    if k < 1 or scores.numel() % k:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {k} samples per prompt")
    r = scores.detach().to(torch.float64).reshape(-1, k)
    out: dict[str, float] = {}
    if k >= 2:
        out["within_prompt_sd"] = float(r.std(1, correction=1).mean())
    if r.shape[0] >= 2:
        out["across_prompt_sd"] = float(r.mean(1).std(correction=1))
    return out


# ----------------------------------------------------------------------------------------- losses


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, averaged over masked tokens. All inputs (B, T).

    Returns (pg_loss, clipfrac, approx_kl): clipfrac is the share of tokens where the clipped term is the
    active (larger) one; approx_kl = E[(r - 1) - log r], r = pi / pi_old (Schulman's k3 estimator).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.maximum(pg_unclipped, pg_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg_clipped > pg_unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return pg_loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * E[max((V - R)^2, (V_clip - R)^2)], V_clip = V_old + clip(V - V_old, ±c).

    All inputs (B, T). Returns (v_loss, v_clipfrac).
    """
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    v_loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        v_clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return v_loss, v_clipfrac


# ----------------------------------------------------------------------------------------- KL controllers


@dataclass
class KLController:
    """The KL coefficient. Fixed when `target` is None, else adaptive (Ziegler et al. 2019):

    e = clip(KL / target - 1, -0.2, 0.2);  coef <- coef * (1 + e * n_samples / horizon).
    """

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, current_kl: float, n_samples: int) -> float:
        if self.target is not None:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_samples / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
