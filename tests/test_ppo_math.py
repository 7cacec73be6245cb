"""The PPO / RLOO / GRPO math against reference loops and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from services.policy_trainer import ppo_math as pm


def reference_gae(rewards, values, lengths, gamma, lam):
    """Textbook GAE, one sequence and one time step at a time (V after the last token = 0)."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
            ret[b][t] = last + values[b][t]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_reference_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 9
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [9, 1, 5, 3, 9, 7]
    mask = torch.zeros(B, T, dtype=torch.float64)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    # garbage beyond the mask must not leak into the advantages
    rewards_noisy = rewards + (1 - mask) * 100
    values_noisy = values + (1 - mask) * -50
    adv, ret = pm.compute_gae(rewards_noisy, values_noisy, mask, gamma, lam)
    ref_adv, ref_ret = reference_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(ref_adv, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, torch.tensor(ref_ret, dtype=torch.float64), rtol=0, atol=1e-12)


def test_gae_hand_computed():
    # one sequence, 2 tokens: r = [0, 1], V = [0.5, 0.25], gamma = lam = 1
    # delta1 = 1 + 0 - 0.25 = 0.75; delta0 = 0 + 0.25 - 0.5 = -0.25; A0 = -0.25 + 0.75 = 0.5
    adv, ret = pm.compute_gae(
        torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2), 1.0, 1.0
    )
    assert adv.tolist() == [[0.5, 0.75]]
    assert ret.tolist() == [[1.0, 1.0]]


def test_token_rewards_put_score_on_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    r = pm.token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, 2.0 - 0.15], [-1.0 - 0.25, 0.0, 0.0]]))


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert pm.kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    # k3 = r - 1 - log r with r = ref/p = 0.5
    assert pm.kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - 1 - math.log(0.5))
    assert pm.kl_penalty(ref, logp, "abs").item() == pytest.approx(math.log(2))
    assert pm.kl_penalty(logp, ref, "mse").item() == pytest.approx(0.5 * math.log(2) ** 2)
    with pytest.raises(ValueError, match="unknown KL estimator 'k9'"):
        pm.kl_penalty(logp, ref, "k9")


def test_policy_loss_hand_computed():
    # token 1: ratio 1.5, A = +1 -> clipped at 1.2: loss max(-1.5, -1.2) = -1.2, clipped term active
    # token 2: ratio 0.5, A = +2 -> unclipped -1.0 vs clipped -1.6: max = -1.0, clipped not active
    # token 3: masked out
    logp = torch.log(torch.tensor([[1.5, 0.5, 9.0]]))
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipfrac, approx_kl = pm.policy_loss(logp, old, adv, mask, cliprange=0.2)
    assert loss.item() == pytest.approx((-1.2 - 1.0) / 2)
    assert clipfrac.item() == pytest.approx(0.5)
    expected_kl = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2
    assert approx_kl.item() == pytest.approx(expected_kl)


def test_policy_loss_gradient_is_zero_when_clipped():
    logp = torch.log(torch.tensor([[1.5]])).requires_grad_()
    loss, _, _ = pm.policy_loss(logp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    loss.backward()
    assert logp.grad.item() == 0.0


def test_value_loss_hand_computed():
    # V = 2, V_old = 1, R = 3, clip 0.5 -> V_clip = 1.5; max((2-3)^2, (1.5-3)^2) = 2.25 -> 0.5 * 2.25
    # V = 0.9, V_old = 1, R = 1 -> V_clip = 0.9 (inside); both 0.01 -> 0.005, not clipped
    loss, frac = pm.value_loss(
        torch.tensor([[2.0, 0.9]]),
        torch.tensor([[1.0, 1.0]]),
        torch.tensor([[3.0, 1.0]]),
        torch.ones(1, 2),
        0.5,
    )
    assert loss.item() == pytest.approx(0.5 * (2.25 + 0.01) / 2)
    assert frac.item() == pytest.approx(0.5)


def test_rloo_and_grpo_advantages():
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    # group [1, 2, 6]: baselines (2+6)/2=4, (1+6)/2=3.5, (1+2)/2=1.5
    torch.testing.assert_close(pm.rloo_advantages(r, 3), torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    adv = pm.grpo_advantages(r, 3, eps=0.0)
    g1 = torch.tensor([1.0, 2.0, 6.0])
    torch.testing.assert_close(adv[:3], (g1 - 3.0) / g1.std())
    assert pm.grpo_advantages(r, 3, scale=False)[3:].tolist() == [-1.0, -1.0, 2.0]
    with pytest.raises(ValueError, match="at least 2 samples"):
        pm.rloo_advantages(r, 1)


def test_reward_spread_hand_computed():
    """Within- and across-prompt sd (ddof = 1) of prompt-major scores, against hand arithmetic. Tolerance
    1e-12: the values are O(1) and each is a handful of float64 operations (unit roundoff 1.1e-16)."""
    # 2 prompts x 3 samples: [1, 2, 3] (mean 2, sd 1) and [4, 4, 7] (mean 5, squares 1 + 1 + 4 = 6, sd √3)
    got = pm.reward_spread(torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 7.0], dtype=torch.float64), 3)
    assert set(got) == {"within_prompt_sd", "across_prompt_sd"}
    assert got["within_prompt_sd"] == pytest.approx((1 + math.sqrt(3)) / 2, abs=1e-12)
    assert got["across_prompt_sd"] == pytest.approx(math.sqrt(4.5), abs=1e-12)  # means 2, 5: 2 · 1.5² / 1
    # the layout matters: the same scores read as 3 prompts x 2 samples ([1, 2], [3, 4], [4, 7])
    got = pm.reward_spread(torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 7.0], dtype=torch.float64), 2)
    assert got["within_prompt_sd"] == pytest.approx((1 + 1 + 3) / math.sqrt(2) / 3, abs=1e-12)
    assert got["across_prompt_sd"] == pytest.approx(math.sqrt(((1.5 - 3.5) ** 2 + 0 + 2.0**2) / 2), abs=1e-12)
    # one sample per prompt: no within-prompt sd; the across-prompt sd is the scores' sd
    got = pm.reward_spread(torch.tensor([1.0, 3.0, 2.0], dtype=torch.float32), 1)
    assert got == {"across_prompt_sd": pytest.approx(1.0, abs=1e-12)}
    # one prompt: no across-prompt sd
    assert pm.reward_spread(torch.tensor([0.0, 2.0], dtype=torch.float64), 2) == {
        "within_prompt_sd": pytest.approx(math.sqrt(2), abs=1e-12)
    }
    # equal scores within each prompt: a reward that ranks prompts but never a prompt's replies
    got = pm.reward_spread(torch.tensor([1.0, 1.0, 5.0, 5.0], dtype=torch.float64), 2)
    assert got["within_prompt_sd"] == 0.0 and got["across_prompt_sd"] == pytest.approx(
        math.sqrt(8), abs=1e-12
    )
    with pytest.raises(ValueError, match="do not split into groups of 2"):
        pm.reward_spread(torch.zeros(3), 2)


def test_whiten_and_explained_variance():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = pm.masked_whiten(x, mask)
    torch.testing.assert_close(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    kept = pm.masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept[0, :3], torch.tensor([1.0, 2.0, 3.0]), atol=1e-6, rtol=0)
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    assert pm.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert pm.explained_variance(torch.zeros(1, 4) + 2.0, returns, mask) == pytest.approx(0.0)
    assert math.isnan(pm.explained_variance(returns, torch.ones(1, 4), mask))


def test_entropy_and_logprobs_from_logits():
    logits = torch.zeros(1, 1, 4)
    assert pm.entropy_from_logits(logits).item() == pytest.approx(math.log(4))
    assert pm.logprobs_from_logits(logits, torch.tensor([[2]])).item() == pytest.approx(math.log(0.25))


def test_kl_controller_fixed_and_adaptive():
    fixed = pm.KLController(0.1)
    assert fixed.update(50.0, 64) == 0.1
    ctl = pm.KLController(0.1, target=6.0, horizon=1000)
    # KL far above target: error clipped to +0.2 -> 0.1 * (1 + 0.2 * 100 / 1000)
    assert ctl.update(60.0, 100) == pytest.approx(0.1 * 1.02)
    # KL below target by half: error -0.5 clipped to -0.2
    before = ctl.value
    assert ctl.update(3.0, 100) == pytest.approx(before * 0.98)
    # small error passes through: KL 6.6 -> error 0.1
    before = ctl.value
    assert ctl.update(6.6, 1000) == pytest.approx(before * 1.1)
    restored = pm.KLController(1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored == ctl
