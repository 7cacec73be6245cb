"""Held-out reward of the base vs the trained policy, measured at the end of every completed run.

The replies come from the run's own rollout engine (vLLM where the run uses it, else transformers
`generate`), `eval.heldout_samples` = k replies per prompt and policy, in batches of
`eval.heldout_batch_size` replies with a progress line per batch, row-seeded: reply j of prompt i is row
i·k + j, sampled with the row seed (heldout_seed, i·k + j) for both policies (k = 1: row i, as before k
existed). The base replies before the first update (`prepare_base_replies`, kept in `heldout_base.json` so a
resumed run reuses them), the trained ones after the last. Where the base replies are not there (a run
resumed from a checkpoint written before this file existed, or several ranks, where the other ranks must not
wait for rank 0's generation), both come from transformers `generate` with the reference and the trained
module at the end, as before.
`evaluate_heldout(trainer)` then scores both through the run's own reward source (the reward service over
HTTP in a normal run) and writes `heldout_reward.json`:

    {"n", "samples_per_prompt", "source", "base_mean", "trained_mean", "delta", "ci_low", "ci_high", "p",
     "test", "mde", "kl_mean", "base_eos_rate", "trained_eos_rate", "base_mean_words", "trained_mean_words",
     "base_across_prompt_sd", "trained_across_prompt_sd", "base_within_prompt_sd", "trained_within_prompt_sd"}

`n` counts prompts; the paired test compares per-prompt mean scores (the mean of a prompt's k replies).
KL, EOS rates and words are means over all n·k replies. The reward's spread per policy
(`ppo_math.reward_spread`: how much of a teaching signal it gives on that policy's own samples):
`*_across_prompt_sd` is the sd of the per-prompt mean scores, `*_within_prompt_sd` the mean over prompts of
the sd of a prompt's k scores (null when k = 1).

The statistics are pure functions: `paired_summary` (paired bootstrap CI of the mean difference and a
two-sided sign-flip permutation test — `karma.eval.metrics.paired_delta`) and `paired_mde` (minimum
detectable mean difference of a paired test). Scores are the reward source's (normalised when
`reward_normalize`), without the trainer's missing-EOS penalty: the EOS rates are reported beside them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import types
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np

from karma.progress import Progress

if TYPE_CHECKING:
    from services.policy_trainer.engines import Generation
    from services.policy_trainer.trainer import Trainer

log = logging.getLogger(__name__)

RESULT_FILE = "heldout_reward.json"
BASE_FILE = "heldout_base.json"  # the base policy's held-out replies, generated before the first update
N_BOOT = 2000
N_PERM = 10000
KEYS = (
    "n",
    "samples_per_prompt",
    "source",
    "base_mean",
    "trained_mean",
    "delta",
    "ci_low",
    "ci_high",
    "p",
    "test",
    "mde",
    "kl_mean",
    "base_eos_rate",
    "trained_eos_rate",
    "base_mean_words",
    "trained_mean_words",
    "base_across_prompt_sd",
    "trained_across_prompt_sd",
    "base_within_prompt_sd",
    "trained_within_prompt_sd",
)


# ============================================================================================ statistics
def paired_mde(diff: Sequence[float], *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable mean difference of a two-sided paired test: (z_{1-α/2} + z_power) · sd(d) / √n
    (= (1.96 + 0.8416) · sd / √n at α = 0.05, power 0.8); sd with n - 1 degrees of freedom."""
    d = np.asarray(diff, dtype=float)
    if d.size < 2:
        return math.nan
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return float(z * d.std(ddof=1) / math.sqrt(d.size))


def paired_summary(
    base: Sequence[float],
    trained: Sequence[float],
    *,
    n_boot: int = N_BOOT,
    n_perm: int = N_PERM,
    seed: int = 0,
) -> dict[str, Any]:
    """trained - base on paired items: means, delta, paired-bootstrap 95 % CI (`n_boot` resamples), two-sided
    sign-flip permutation p (`n_perm` permutations, seeded) and the MDE."""
    from karma.eval.metrics import paired_delta

    if len(base) != len(trained):
        raise ValueError(f"paired samples differ in size: {len(base)} vs {len(trained)}")
    if len(base) == 0:
        raise ValueError("no held-out items to compare")
    r = paired_delta(base, trained, n_boot=n_boot, n_perm=n_perm, seed=seed)
    diff = np.asarray(trained, dtype=float) - np.asarray(base, dtype=float)
    return {
        "n": len(base),
        "base_mean": float(np.mean(base)),
        "trained_mean": float(np.mean(trained)),
        "delta": float(r["delta"]),
        "ci_low": float(r["ci_low"]),
        "ci_high": float(r["ci_high"]),
        "p": float(r["p"]),
        "test": r["test"],
        "mde": paired_mde(diff),
    }


# ============================================================================================ the run
def evaluate_heldout(trainer: Trainer) -> dict[str, Any]:
    """Generate, score and compare on the trainer's held-out prompts; write and return heldout_reward.json."""
    import torch

    from karma.rm.rule import count_words
    from services.policy_trainer.policy import pack_sequences
    from services.policy_trainer.ppo_math import reward_spread

    cfg, ev = trainer.cfg, trainer.cfg.eval
    start = time.perf_counter()
    k = ev.heldout_samples
    prompts = [trainer.heldout[i] for i in range(len(trainer.heldout))]
    rows = [p for p in prompts for _ in range(k)]  # row i·k + j: reply j of prompt i
    temperature = cfg.rollout.temperature if ev.heldout_temperature is None else ev.heldout_temperature
    max_new = ev.heldout_max_new_tokens or cfg.rollout.max_new_tokens
    policy, tok = trainer.policy, trainer.tokenizer
    policy.eval()

    def generate(lm) -> list[Generation]:
        return generate_replies(
            lm,
            tok,
            trainer.eos_ids,
            [p.prompt_ids for p in rows],
            temperature=temperature,
            max_new_tokens=max_new,
            batch_size=ev.heldout_batch_size,
            seed=ev.heldout_seed,
        )

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    base = trainer.heldout_base
    if base is not None and trainer.engine is not None:  # base replies from before the first update
        trained = engine_replies(trainer, "trained", logprobs=temperature == 1.0)
    else:
        with policy.reference_lm() as ref_lm:
            base = generate(ref_lm)
        trained = generate(policy.lm)
    seconds["generate"] = time.perf_counter() - t

    # sequence KL(trained || base) on the trained replies, k1 summed over tokens, at the sampling temperature
    kl_temp = temperature if temperature > 0 else 1.0
    t = time.perf_counter()
    kls: list[float] = []
    progress = Progress(log, "held-out KL(trained || base)", len(rows), "replies")
    with torch.no_grad():
        for s in range(0, len(rows), cfg.ppo.micro_batch_size):  # small chunks: faster on CPU than 32
            chunk = range(s, min(s + cfg.ppo.micro_batch_size, len(rows)))
            packed = pack_sequences(
                [rows[i].prompt_ids for i in chunk],
                [trained[i].response_ids for i in chunk],
                tok.pad_token_id,
            )
            args = (packed.input_ids, packed.attention_mask, packed.prompt_len, kl_temp)
            ref = policy.forward_responses(*args, reference=True).logprobs
            ref_sum = (ref * packed.response_mask.to(ref.device)).sum(1).tolist()
            given = [trained[i].logprob for i in chunk]
            if all(
                lp is not None and math.isfinite(lp) for lp in given
            ):  # the engine's: one forward, not two
                kls += [lp - r for lp, r in zip(given, ref_sum, strict=True)]
            else:
                new = policy.forward_responses(*args, with_values=False, with_entropy=False).logprobs
                kls += [
                    n - r
                    for n, r in zip(
                        (new * packed.response_mask.to(new.device)).sum(1).tolist(), ref_sum, strict=True
                    )
                ]
            progress.update(len(chunk))
    seconds["kl"] = time.perf_counter() - t

    texts = {
        name: [tok.decode(g.response_ids, skip_special_tokens=True).strip() for g in gens]
        for name, gens in (("base", base), ("trained", trained))
    }
    timeout = cfg.reward.reward_deadline_s + cfg.reward.reward_timeout_s + 30
    t = time.perf_counter()
    futures = {
        name: trainer.rewards.submit([p.score_item(r) for p, r in zip(rows, replies, strict=True)])
        for name, replies in texts.items()
    }
    scores = {name: np.asarray(f.result(timeout), dtype=np.float64) for name, f in futures.items()}
    seconds["reward"] = time.perf_counter() - t

    per_prompt = {name: s.reshape(len(prompts), k).mean(1) for name, s in scores.items()}
    result = {"n": len(prompts), "samples_per_prompt": k, "source": trainer.heldout_source}
    result |= paired_summary(per_prompt["base"], per_prompt["trained"], seed=ev.heldout_seed)
    for name, s in scores.items():
        spread = reward_spread(torch.from_numpy(s), k)
        result[f"{name}_across_prompt_sd"] = spread.get("across_prompt_sd", math.nan)
        result[f"{name}_within_prompt_sd"] = spread.get("within_prompt_sd")
    result |= {
        "kl_mean": float(np.mean(kls)),
        "base_eos_rate": float(np.mean([g.ended_with_eos for g in base])),
        "trained_eos_rate": float(np.mean([g.ended_with_eos for g in trained])),
        "base_mean_words": float(np.mean([count_words(x) for x in texts["base"]])),
        "trained_mean_words": float(np.mean([count_words(x) for x in texts["trained"]])),
    }
    result = {key: result[key] for key in KEYS}
    write_result(trainer.out, result)

    def sds(which: str) -> str:
        b, t = result[f"base_{which}_prompt_sd"], result[f"trained_{which}_prompt_sd"]
        return "—" if b is None else f"{b:.3f} -> {t:.3f}"

    log.info(
        "held-out reward (%d prompts x %d replies, %s, T=%g): base %.4f -> trained %.4f, delta %+.4f "
        "[%.4f, %.4f], p = %.4g, MDE %.4f, KL %.3f, EOS %.2f -> %.2f, words %.1f -> %.1f, reward sd across "
        "prompts %s, within %s (%.0fs: %s)",
        result["n"],
        k,
        result["source"],
        temperature,
        result["base_mean"],
        result["trained_mean"],
        result["delta"],
        result["ci_low"],
        result["ci_high"],
        result["p"],
        result["mde"],
        result["kl_mean"],
        result["base_eos_rate"],
        result["trained_eos_rate"],
        result["base_mean_words"],
        result["trained_mean_words"],
        sds("across"),
        sds("within"),
        time.perf_counter() - start,
        ", ".join(f"{phase} {v:.0f}s" for phase, v in seconds.items()),
    )
    return result


def generate_replies(
    lm,
    tokenizer,
    eos_ids: set[int],
    prompt_ids: Sequence[Sequence[int]],
    *,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> list[Generation]:
    """Replies of a causal LM (transformers `generate`): `batched_replies` of an `HFEngine` on it."""
    from services.policy_trainer.engines import HFEngine

    engine = HFEngine(types.SimpleNamespace(lm=lm), tokenizer, eos_ids)
    return batched_replies(
        engine,
        prompt_ids,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
    )


def batched_replies(
    engine,
    prompt_ids: Sequence[Sequence[int]],
    *,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    progress: Progress | None = None,
    logprobs: bool = False,
) -> list[Generation]:
    """Replies of a rollout engine in batches of `batch_size`, `prompt_ids[i]` sampled with the row seed
    (seed, i) (`engines.row_seed`), so two policies given the same prompts and settings get the same batches
    and seeds. A prompt repeated k times (k replies) gets k rows, hence k seeds."""
    gens: list[Generation] = []
    for s in range(0, len(prompt_ids), batch_size):
        rows = list(range(s, min(s + batch_size, len(prompt_ids))))
        out = engine.generate(
            [list(prompt_ids[i]) for i in rows],
            seed=seed,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            row_ids=rows,
            logprobs=logprobs,
        )
        gens += [dataclasses.replace(g, index=rows[g.index]) for g in out]
        if progress is not None:
            progress.update(len(rows))
    return gens


def engine_replies(trainer: Trainer, which: str, *, logprobs: bool = False) -> list[Generation]:
    """The held-out replies of the policy the rollout engine holds now, `eval.heldout_samples` = k per prompt,
    in batches of `eval.heldout_batch_size`: reply j of prompt i is row i·k + j, seeded by
    (heldout_seed, i·k + j) whatever the batch."""
    cfg, ev = trainer.cfg, trainer.cfg.eval
    temperature = cfg.rollout.temperature if ev.heldout_temperature is None else ev.heldout_temperature
    max_new = ev.heldout_max_new_tokens or cfg.rollout.max_new_tokens
    k = ev.heldout_samples
    ids = [trainer.heldout[i].prompt_ids for i in range(len(trainer.heldout)) for _ in range(k)]
    progress = Progress(
        log, f"held-out replies of the {which} policy ({trainer.engine.name})", len(ids), "replies"
    )
    return batched_replies(
        trainer.engine,
        ids,
        temperature=temperature,
        max_new_tokens=max_new,
        batch_size=ev.heldout_batch_size,
        seed=ev.heldout_seed,
        progress=progress,
        logprobs=logprobs,
    )


def _base_settings(trainer: Trainer) -> dict[str, Any]:
    cfg, ev = trainer.cfg, trainer.cfg.eval
    return {
        "n": len(trainer.heldout),
        "samples_per_prompt": ev.heldout_samples,
        "seed": ev.heldout_seed,
        "temperature": cfg.rollout.temperature if ev.heldout_temperature is None else ev.heldout_temperature,
        "max_new_tokens": ev.heldout_max_new_tokens or cfg.rollout.max_new_tokens,
        "prompt_ids": [list(trainer.heldout[i].prompt_ids) for i in range(len(trainer.heldout))],
    }


def prepare_base_replies(trainer: Trainer) -> list[Generation] | None:
    """The base policy's held-out replies: read from `heldout_base.json` when it holds them for the same
    prompts and settings, else generated now by the rollout engine when no update has happened yet (step 0),
    and saved; None otherwise (the end of the run then generates them from the reference module)."""
    from services.policy_trainer.engines import Generation

    path = trainer.out / BASE_FILE
    settings = _base_settings(trainer)
    if path.exists():
        saved = json.loads(path.read_text())
        saved.setdefault("samples_per_prompt", 1)  # written before heldout_samples existed: one reply each
        if {k: saved.get(k) for k in settings} == settings:
            return [Generation(i, r["ids"], r["eos"]) for i, r in enumerate(saved["replies"])]
        log.warning("%s was written for other held-out prompts or settings: not used", path)
    if trainer.step != 0:
        return None
    gens = engine_replies(trainer, "base")
    replies = [{"ids": g.response_ids, "eos": g.ended_with_eos} for g in gens]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings | {"engine": trainer.engine.name, "replies": replies}))
    tmp.replace(path)
    return gens


def write_result(out: Path, result: dict[str, Any]) -> Path:
    missing = [k for k in KEYS if k not in result]
    if missing or len(result) != len(KEYS):
        raise ValueError(f"heldout result must have exactly the keys {KEYS}; missing {missing}")
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
    path = Path(out) / RESULT_FILE
    path.write_text(json.dumps(clean, indent=2) + "\n")
    return path
