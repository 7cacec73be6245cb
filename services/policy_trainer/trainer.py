"""The trainer: PPO / RLOO / GRPO of a causal LM against a `RewardSource`, rollouts from an engine.

`Trainer.fit()` is a loop over `train_step()`, and a step is a short sequence of named, timed phases:

    rollout     generate the batch; rewards of finished responses are requested as they finish
    logprobs    old log-probs, values (policy) and reference log-probs — while the rewards are in flight
    reward_wait block until the last reward arrived
    advantages  KL penalty, GAE (ppo) or group baselines (rloo / grpo)
    update      epochs x minibatches x micro-batches (gradient accumulation), clipped losses
    sync        load the new weights into the rollout engine
    log         the step's row in metrics.jsonl and TensorBoard
    checkpoint  every `save_every` steps (after the row: a kill between the two loses no row)

Each phase's seconds go to `timing/<phase>` (the checkpoint's to the log). A loss, PPO statistic or gradient
norm that is NaN or infinite stops the run with `TrainingDivergedError` before that gradient is applied. A
completed run ends with the held-out reward of base vs trained policy (`heldout.evaluate_heldout` →
heldout_reward.json); every run, failed ones included, writes trainer_result.json.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import pickle
import random
import re
import shutil
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.policy_trainer import ppo_math as pm
from services.policy_trainer.config import TrainConfig
from services.policy_trainer.engines import Generation, HFEngine, RolloutEngine
from services.policy_trainer.policy import Policy, check_policy_path, pack_sequences
from services.policy_trainer.prompts import PromptPool, PromptSampler, build_prompts, load_prompt_sets
from services.policy_trainer.rewards import (
    HTTPRewardSource,
    LocalRewardSource,
    RewardDispatcher,
    RewardSource,
    RewardUnavailableError,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"


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


class PhaseTimer:
    """`with timer("rollout"): ...` adds the block's seconds to `timing/rollout`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"timing/{k}": v for k, v in self.seconds.items()}


class StopRequested(Exception):
    """Internal: a signal asked the run to stop after the current step."""


class TrainingDivergedError(RuntimeError):
    """A loss, PPO statistic or the gradient norm of an update was NaN or infinite: the run stops before that
    gradient is applied. `values` maps each non-finite quantity to its value; `step` is the failing step."""

    def __init__(self, message: str, *, step: int, values: dict[str, float]):
        super().__init__(message)
        self.step = step
        self.values = values


class CheckpointLoadError(ValueError):
    """A checkpoint that holds something other than tensors and plain data; refused without running it."""


class Trainer:
    """Build with a validated `TrainConfig`; `fit()` runs it. A `reward_source` may be injected (tests,
    benchmarks); otherwise it is built from the config's reward section."""

    def __init__(self, config: TrainConfig, *, reward_source: RewardSource | None = None):
        self.cfg = config
        self.out = Path(config.run.output_dir)
        self._reward_source = reward_source
        self._ready = False
        self._stop_signal: str | None = None
        self.step = 0
        self.samples_seen = 0
        self.last_metrics: dict[str, float] = {}
        self._optimizer_steps_in_step = 0  # optimizer steps already taken by the step in progress

    # ================================================================================ set-up
    def setup(self) -> None:
        """Everything that can fail on bad input runs before any model loads, then the models load."""
        if self._ready:
            return
        from transformers import AutoTokenizer

        from karma.models import resolve_policy

        cfg = self.cfg
        if cfg.run.torch_threads:
            torch.set_num_threads(cfg.run.torch_threads)
        self.policy_path = resolve_policy(cfg.model.policy)
        check_policy_path(self.policy_path)
        self.rewards = RewardDispatcher(self._reward_source or self._build_reward_source())
        ready = getattr(self.rewards.source, "wait_ready", None)
        if ready is not None:
            self.rewards.call(ready, cfg.reward.reward_ready_timeout_s)
        t0 = time.perf_counter()
        sets = load_prompt_sets(cfg.data.prompts, split=cfg.data.split, prompt_field=cfg.data.prompt_field,
                                max_prompts=cfg.data.max_prompts, heldout=cfg.eval.heldout_prompts,
                                heldout_split=cfg.eval.heldout_split, heldout_seed=cfg.eval.heldout_seed)
        self.tokenizer = AutoTokenizer.from_pretrained(self.policy_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        render = {"system_prompt": cfg.data.system_prompt, "max_length": cfg.data.max_prompt_length}
        self.prompts: PromptPool = build_prompts(sets.train, self.tokenizer, **render)  # rendered when drawn
        self.heldout: PromptPool = build_prompts(sets.heldout, self.tokenizer, **render)
        self.heldout_source = sets.heldout_source
        log.info("prompts: %d for training, %d held out (%.1fs)", len(self.prompts), len(self.heldout),
                 time.perf_counter() - t0)
        self.eos_ids = self._eos_ids()
        if cfg.run.resume and self.latest_checkpoint() is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.out / CHECKPOINT_DIR}")
        if not cfg.run.resume and self.latest_checkpoint() is not None:
            raise FileExistsError(
                f"{self.out} already holds checkpoints of another run: pass --resume to continue it, or choose "
                "another output_dir"
            )
        self.out.mkdir(parents=True, exist_ok=True)

        # vLLM seeds the global RNGs when it starts: start it first, seed after
        self.engine: RolloutEngine | None = None
        if cfg.engine == "vllm":
            from services.policy_trainer.engines import VLLMEngine

            self.engine = VLLMEngine(
                self.policy_path, dtype=cfg.model.dtype, seed=cfg.run.seed, eos_ids=self.eos_ids,
                max_model_len=cfg.data.max_prompt_length + cfg.rollout.max_new_tokens,
                kv_cache_gib=cfg.rollout.vllm_kv_cache_gib,
                gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
                enforce_eager=cfg.rollout.vllm_enforce_eager,
            )
        set_seed(cfg.run.seed)
        self.policy = Policy.load(cfg.model, self.policy_path, with_value_head=cfg.ppo.algo == "ppo")
        if self.engine is None:
            self.engine = HFEngine(self.policy, self.tokenizer, self.eos_ids)
        params = [p for _, p in self.policy.trainable_named_parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.ppo.learning_rate, weight_decay=cfg.ppo.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.kl_ctl = pm.KLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
        self.sampler = PromptSampler(len(self.prompts), cfg.run.seed, cfg.data.shuffle)
        if cfg.run.resume:
            self._resume()
        self._open_sinks()
        (self.out / "train_config.yaml").write_text(cfg.to_yaml())
        self._ready = True

    def _build_reward_source(self) -> RewardSource:
        r = self.cfg.reward
        if r.reward_url:
            return HTTPRewardSource(r.reward_url, api_key=r.reward_api_key, model=r.reward_model_name,
                                    normalize=r.reward_normalize, timeout_s=r.reward_timeout_s,
                                    deadline_s=r.reward_deadline_s)
        return LocalRewardSource.load(r.reward_model, normalize=r.reward_normalize)

    def _eos_ids(self) -> set[int]:
        from transformers import GenerationConfig

        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        try:
            gen_eos = GenerationConfig.from_pretrained(self.policy_path).eos_token_id
        except OSError:
            gen_eos = None
        if gen_eos is not None:
            ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        if not ids:
            raise ValueError(f"policy {self.policy_path} defines no EOS token")
        return ids

    def _lr_lambda(self, opt_step: int) -> float:
        p = self.cfg.ppo
        total = max(self.cfg.run.steps * p.optimizer_steps_per_step, 1)
        if p.warmup_steps and opt_step < p.warmup_steps:
            return (opt_step + 1) / p.warmup_steps
        if p.lr_scheduler == "constant":
            return 1.0
        frac = min((opt_step - p.warmup_steps) / max(total - p.warmup_steps, 1), 1.0)
        return 1.0 - frac if p.lr_scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

    # ================================================================================ the loop
    def fit(self) -> dict[str, Any]:
        """Train until `steps` or a stop signal (checkpoint, then return); a completed run then measures its
        held-out reward. A failure after set-up — `RewardUnavailableError` or `TrainingDivergedError` (both
        checkpoint first when the state is exactly that of a step's start), or anything else — writes
        trainer_result.json with status "failed", then re-raises. Returns {'status', 'step', 'output_dir',
        'last_metrics'} (+ 'heldout', the content of heldout_reward.json)."""
        self.setup()
        try:
            status = self._run_steps()
            if status == "completed":
                if self.cfg.run.save_every and not self._checkpoint_exists(self.step):
                    self.save_checkpoint()
                self.policy.save_pretrained(self.out, self.tokenizer)
        except (Exception, KeyboardInterrupt) as exc:
            self._write_result(self._failure_result(exc))
            raise
        result = {"status": status, "step": self.step, "output_dir": str(self.out), "last_metrics": self.last_metrics}
        self._write_result(result)
        if status == "completed" and len(self.heldout):
            from services.policy_trainer.heldout import evaluate_heldout

            result["heldout"] = evaluate_heldout(self)
        return result

    def _run_steps(self) -> str:
        """`train_step` until `steps` ("completed") or a stop signal (checkpoint, "stopped (SIGTERM)")."""
        with self._stop_on_signals():
            try:
                while self.step < self.cfg.run.steps:
                    if self._stop_signal:
                        raise StopRequested
                    self.train_step()
                    if self._stop_signal:
                        raise StopRequested
            except StopRequested:
                path = self.save_checkpoint()
                log.warning("stopped by %s at step %d; checkpoint %s (continue with --resume)",
                            self._stop_signal, self.step, path)
                return f"stopped ({self._stop_signal})"
        return "completed"

    def _failure_result(self, exc: BaseException) -> dict[str, Any]:
        checkpoint = self.latest_checkpoint()
        return {"status": "failed", "step": self.step, "output_dir": str(self.out), "error_type": type(exc).__name__,
                "error": str(exc), "checkpoint": str(checkpoint) if checkpoint else None,
                "last_metrics": self.last_metrics}

    def _write_result(self, result: dict[str, Any]) -> None:
        (self.out / "trainer_result.json").write_text(json.dumps(_json_safe(result), indent=2))

    def train_step(self) -> dict[str, float]:
        """One rollout + update; logs the step's metrics, then checkpoints (every `save_every` steps)."""
        timer = PhaseTimer()
        start = time.perf_counter()
        at_start = {"sampler": self.sampler.state_dict(), "kl_controller": self.kl_ctl.state_dict()}
        self._optimizer_steps_in_step = 0
        with timer("rollout"):
            batch = self.rollout()
        with timer("logprobs"):
            self.score_logprobs(batch)
        try:
            with timer("reward_wait"):
                self.collect_rewards(batch)
            with timer("advantages"):
                metrics = self.compute_advantages(batch)
            with timer("update"):
                metrics |= self.update(batch)
        except RewardUnavailableError as exc:
            raise RewardUnavailableError(f"{exc} -- {self._stop_in_step(at_start)}") from exc
        except TrainingDivergedError as exc:
            raise TrainingDivergedError(f"{exc} -- {self._stop_in_step(at_start)}", step=exc.step,
                                        values=exc.values) from exc
        with timer("sync"):
            self.engine.sync_weights(self.policy)
        self.step += 1
        self.samples_seen += batch.size
        step_s = time.perf_counter() - start
        n_tokens = float(batch.response_mask.sum())
        metrics |= timer.metrics()
        metrics |= {
            "step": self.step,
            "samples": self.samples_seen,
            "speed/step_s": step_s,
            "speed/rollout_tokens_per_s": n_tokens / max(timer.seconds["rollout"], 1e-9),
            "speed/reward_wait_share": timer.seconds["reward_wait"] / step_s,
            "lr": self.scheduler.get_last_lr()[0],
        }
        self._log(metrics)  # before the checkpoint: resume drops rows after its step, so no row is ever lost
        self.last_metrics = metrics
        if self.cfg.run.save_every and self.step % self.cfg.run.save_every == 0:
            t0 = time.perf_counter()
            path = self.save_checkpoint()
            log.info("checkpoint %s (%.1fs)", path, time.perf_counter() - t0)
        return metrics

    def _stop_in_step(self, at_start: dict[str, Any]) -> str:
        """The failed step's state for the error message. Before its first optimizer step the state is exactly
        that of the step's start once the prompt position and KL controller are rewound: saved as a checkpoint,
        so --resume redoes the step. After one, the weights are part-updated and not saved."""
        failed = self.step + 1
        if self._optimizer_steps_in_step:
            newest = self.latest_checkpoint()
            return (f"training stopped in step {failed} after {self._optimizer_steps_in_step} optimizer step(s) of "
                    f"it; that state is not saved; newest checkpoint: {newest or 'none'}")
        self.sampler.load_state_dict(at_start["sampler"])
        self.kl_ctl.load_state_dict(at_start["kl_controller"])
        path = self.save_checkpoint()
        return f"training stopped before step {failed}; checkpoint saved to {path} (continue with --resume)"

    # ================================================================================ phases
    def rollout(self) -> RolloutBatch:
        """Sample `prompts_per_step` prompts x `samples_per_prompt` responses; request rewards as they finish."""
        p = self.cfg.ppo
        chosen = self.sampler.take(p.prompts_per_step)
        rows = [i for i in chosen for _ in range(p.samples_per_prompt)]  # groups are consecutive
        pending: list[tuple[list[int], Any]] = []
        texts: dict[int, str] = {}

        def on_finished(gens: list[Generation]) -> None:
            idx = [g.index for g in gens]
            for g in gens:
                texts[g.index] = self.tokenizer.decode(g.response_ids, skip_special_tokens=True).strip()
            prompts = [self.prompts[rows[i]] for i in idx]
            future = self.rewards.submit([pr.context for pr in prompts], [texts[i] for i in idx],
                                         [pr.metadata for pr in prompts])
            pending.append((idx, future))

        gens = self.engine.generate(
            [self.prompts[r].prompt_ids for r in rows], seed=self._seed_for("generate"),
            max_new_tokens=self.cfg.rollout.max_new_tokens, temperature=self.cfg.rollout.temperature,
            on_finished=on_finished,
        )
        packed = pack_sequences([self.prompts[r].prompt_ids for r in rows], [g.response_ids for g in gens],
                                self.tokenizer.pad_token_id)
        return RolloutBatch(
            prompt_index=rows, contexts=[self.prompts[r].context for r in rows],
            responses=[texts[i] for i in range(len(rows))], input_ids=packed.input_ids,
            attention_mask=packed.attention_mask, response_mask=packed.response_mask, prompt_len=packed.prompt_len,
            ended_with_eos=torch.tensor([g.ended_with_eos for g in gens]), pending=pending,
        )

    @torch.no_grad()
    def score_logprobs(self, batch: RolloutBatch) -> None:
        """Old log-probs and values of the current policy, and the reference log-probs (micro-batched)."""
        old, ref, values = [], [], []
        T = self.cfg.rollout.temperature
        for sl in self._micro_slices(batch.size):
            ids, att = batch.input_ids[sl], batch.attention_mask[sl]
            f = self.policy.forward_responses(ids, att, batch.prompt_len, T, with_entropy=False)
            old.append(f.logprobs)
            if f.values is not None:
                values.append(f.values.float())
            ref.append(self.policy.forward_responses(ids, att, batch.prompt_len, T, reference=True).logprobs)
        m = batch.response_mask
        batch.old_logprobs = torch.cat(old) * m
        batch.ref_logprobs = torch.cat(ref) * m
        batch.values = torch.cat(values) * m if values else None

    def collect_rewards(self, batch: RolloutBatch) -> None:
        scores = [math.nan] * batch.size
        deadline = self.cfg.reward.reward_deadline_s + self.cfg.reward.reward_timeout_s + 30
        for idx, future in batch.pending:
            try:
                got = future.result(timeout=deadline)
            except concurrent.futures.TimeoutError:
                raise RewardUnavailableError(f"no reward within {deadline:.0f}s") from None
            for i, s in zip(idx, got, strict=True):
                scores[i] = s
        if any(math.isnan(s) or math.isinf(s) for s in scores):
            raise RewardUnavailableError(f"the reward source returned no/non-finite scores: {scores}")
        batch.scores = torch.tensor(scores, dtype=torch.float32)

    @torch.no_grad()
    def compute_advantages(self, batch: RolloutBatch) -> dict[str, float]:
        p = self.cfg.ppo
        mask = batch.response_mask
        scores = batch.scores.clone()
        penalized = ~batch.ended_with_eos if p.missing_eos_penalty else torch.zeros_like(batch.ended_with_eos)
        scores[penalized] -= p.missing_eos_penalty or 0.0
        if p.score_clip is not None:
            scores = scores.clamp(-p.score_clip, p.score_clip)
        kl = pm.kl_penalty(batch.old_logprobs, batch.ref_logprobs, p.kl_estimator) * mask
        seq_kl = ((batch.old_logprobs - batch.ref_logprobs) * mask).sum(1)  # k1, for logging and the controller
        kl_coef = self.kl_ctl.value
        metrics: dict[str, float] = {}
        if p.algo == "ppo":
            rewards = pm.token_rewards(scores, kl, mask, kl_coef)
            if p.whiten_rewards:
                rewards = pm.masked_whiten(rewards, mask, shift_mean=False)
            adv, ret = pm.compute_gae(rewards, batch.values, mask, p.gamma, p.lam)
            if p.whiten_advantages:
                adv = pm.masked_whiten(adv, mask)
            batch.returns = ret
            metrics["objective/non_score_reward"] = float((-kl_coef * kl).sum(1).mean())
            metrics["value/mean"] = float(pm.masked_mean(batch.values, mask))
            metrics["value/explained_variance"] = pm.explained_variance(batch.values, ret, mask)
        elif p.algo == "rloo":
            seq_reward = scores - kl_coef * kl.sum(1)
            adv = pm.rloo_advantages(seq_reward, p.samples_per_prompt)[:, None] * mask
            metrics["objective/non_score_reward"] = float((-kl_coef * kl.sum(1)).mean())
        else:  # grpo: KL enters the loss, not the reward
            adv = pm.grpo_advantages(scores, p.samples_per_prompt)[:, None] * mask
        batch.advantages = adv
        self.kl_ctl.update(float(seq_kl.mean()), batch.size)
        lengths = mask.sum(1)
        raw = batch.scores
        metrics |= {
            "reward/mean": float(raw.mean()), "reward/std": float(raw.std()) if batch.size > 1 else 0.0,
            "reward/min": float(raw.min()), "reward/max": float(raw.max()),
            "reward/penalized_mean": float(scores.mean()),
            "reward/missing_eos_penalty_frac": float(penalized.float().mean()),
            "objective/kl": float(seq_kl.mean()), "objective/kl_coef": kl_coef,
            "advantages/mean": float(pm.masked_mean(adv, mask)),
            "response/length_mean": float(lengths.mean()), "response/length_max": float(lengths.max()),
            "response/eos_frac": float(batch.ended_with_eos.float().mean()),
        }
        return metrics

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """`epochs` passes of shuffled minibatches; each minibatch is one optimizer step over micro-batches."""
        p = self.cfg.ppo
        sums: dict[str, float] = defaultdict(float)
        n_micro, grad_norms = 0, []
        gen = torch.Generator().manual_seed(self._seed_for("minibatch"))
        self.policy.train()
        try:
            for epoch in range(p.epochs):
                perm = torch.randperm(batch.size, generator=gen)
                for n_mb, start in enumerate(range(0, batch.size, p.mini_batch_size)):
                    where = f"epoch {epoch + 1}, minibatch {n_mb + 1}"
                    mb = perm[start: start + p.mini_batch_size]
                    self.optimizer.zero_grad(set_to_none=True)
                    for m0 in range(0, len(mb), p.micro_batch_size):
                        stats = self._micro_step(batch, mb[m0: m0 + p.micro_batch_size])
                        self._check_finite(stats, where)
                        for k, v in stats.items():
                            sums[k] += v
                        n_micro += 1
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(
                        [q for _, q in self.policy.trainable_named_parameters()], p.max_grad_norm
                    ))
                    self._check_finite({"policy/grad_norm": grad_norm}, where)
                    grad_norms.append(grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self._optimizer_steps_in_step += 1
        finally:
            self.policy.eval()
        return {k: v / n_micro for k, v in sums.items()} | {"policy/grad_norm": sum(grad_norms) / len(grad_norms)}

    def _micro_step(self, batch: RolloutBatch, idx: torch.Tensor) -> dict[str, float]:
        p = self.cfg.ppo
        mask = batch.response_mask[idx]
        f = self.policy.forward_responses(batch.input_ids[idx], batch.attention_mask[idx], batch.prompt_len,
                                          self.cfg.rollout.temperature, with_values=p.algo == "ppo")
        pg_loss, clipfrac, approx_kl = pm.policy_loss(f.logprobs, batch.old_logprobs[idx], batch.advantages[idx],
                                                      mask, p.cliprange)
        entropy = pm.masked_mean(f.entropy, mask)
        loss = pg_loss - p.ent_coef * entropy
        stats = {"loss/policy": pg_loss.item(), "policy/clipfrac": float(clipfrac),
                 "policy/approx_kl": float(approx_kl), "objective/entropy": entropy.item()}
        if p.algo == "ppo":
            v_loss, v_clipfrac = pm.value_loss(f.values.float(), batch.values[idx], batch.returns[idx], mask,
                                               p.cliprange_value)
            loss = loss + p.vf_coef * v_loss
            stats |= {"loss/value": v_loss.item(), "value/clipfrac": float(v_clipfrac)}
        elif p.algo == "grpo":
            kl_loss = pm.masked_mean(pm.kl_penalty(f.logprobs, batch.ref_logprobs[idx], "k3"), mask)
            loss = loss + self.kl_ctl.value * kl_loss
            stats["loss/kl"] = kl_loss.item()
        (loss / self.cfg.ppo.grad_accum_steps).backward()
        stats["loss/total"] = loss.item()
        return stats

    def _check_finite(self, values: dict[str, float], where: str) -> None:
        """Raise `TrainingDivergedError` naming every NaN / infinite value (before its gradient is applied)."""
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            named = ", ".join(f"{k} = {v}" for k, v in bad.items())
            raise TrainingDivergedError(f"non-finite {named} in the update of step {self.step + 1} ({where})",
                                        step=self.step + 1, values=bad)

    # ================================================================================ helpers
    def _micro_slices(self, n: int) -> Iterator[slice]:
        k = self.cfg.ppo.micro_batch_size
        for s in range(0, n, k):
            yield slice(s, min(s + k, n))

    def _seed_for(self, purpose: str) -> int:
        """A seed that depends only on (run seed, step, purpose): a resumed step draws the same numbers."""
        salt = {"generate": 1, "minibatch": 2}[purpose]
        return (self.cfg.run.seed * 1_000_003 + self.step * 7_919 + salt) % 2**31

    # ================================================================================ checkpoints
    def _checkpoint_exists(self, step: int) -> bool:
        return (self.out / CHECKPOINT_DIR / f"step-{step:06d}" / STATE_FILE).exists()

    def save_checkpoint(self) -> Path:
        """Trainable weights (policy or adapters, value head), optimizer, scheduler, KL controller, RNGs,
        prompt position and step — tensors and plain data only, so `--resume` loads it with
        `weights_only=True` — written atomically; older ones beyond `keep_checkpoints` are removed."""
        root = self.out / CHECKPOINT_DIR
        final = root / f"step-{self.step:06d}"
        tmp = root / f".tmp-step-{self.step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "trainable": self.policy.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": get_rng_state(),
            "config": self.cfg.to_dict(),
        }
        torch.save(state, tmp / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        kept = sorted(d for d in root.glob("step-*") if (d / STATE_FILE).exists())
        for old in kept[: -self.cfg.run.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest_checkpoint(self) -> Path | None:
        found = sorted(d for d in (self.out / CHECKPOINT_DIR).glob("step-*") if (d / STATE_FILE).exists())
        return found[-1] if found else None

    def _resume(self) -> None:
        path = self.latest_checkpoint()
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.out / CHECKPOINT_DIR}")
        state = load_trainer_state(path / STATE_FILE)
        self.policy.load_trainable_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.engine.sync_weights(self.policy)
        log.info("resumed from %s (step %d)", path, self.step)

    # ================================================================================ logging
    def _open_sinks(self) -> None:
        metrics_file = self.out / "metrics.jsonl"
        if metrics_file.exists():  # keep the history up to the resumed step, drop anything after it
            lines = [ln for ln in metrics_file.read_text().splitlines()
                     if ln.strip() and self.cfg.run.resume and json.loads(ln)["step"] <= self.step]
            metrics_file.write_text("".join(ln + "\n" for ln in lines))
        self._jsonl = metrics_file.open("a") if "jsonl" in self.cfg.run.report_to else None
        self._tb = None
        if "tensorboard" in self.cfg.run.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1 if self.step else None)

    def _log(self, metrics: dict[str, float]) -> None:
        clean = _json_safe(metrics)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(clean) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if k != "step" and v is not None:
                    self._tb.add_scalar(k, v, self.step)
            self._tb.flush()
        log.info("step %d: reward %.3f kl %.3f kl_coef %.4f loss %.4f (%.1fs)", self.step, metrics["reward/mean"],
                 metrics["objective/kl"], metrics["objective/kl_coef"], metrics["loss/policy"],
                 metrics["speed/step_s"])

    def close(self) -> None:
        for sink in (getattr(self, "_jsonl", None), getattr(self, "_tb", None)):
            if sink is not None:
                sink.close()
        if hasattr(self, "rewards"):
            self.rewards.close()
        if getattr(self, "engine", None) is not None:
            self.engine.close()
            self.engine = None

    # ================================================================================ signals
    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT / SIGTERM: finish the current step, checkpoint, return. A second SIGINT aborts."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self._stop_signal and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = name
            log.warning("%s received: stopping after this step", name)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _json_safe(value: Any) -> Any:
    """`value` with NaN / infinite floats replaced by None (JSON has neither), in nested dicts too."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def get_rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch RNG states as tensors and plain data (loadable with `weights_only=True`)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py, n = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    np.random.set_state({"bit_generator": n["bit_generator"], "has_gauss": n["has_gauss"], "gauss": n["gauss"],
                         "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]}})
    torch.set_rng_state(state["torch"])


def load_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state, unpickled with `weights_only=True`: tensors and plain containers only. Anything
    else — an object whose unpickling would run code — raises `CheckpointLoadError` without being run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = found.group(1) if found else "an object that is not a tensor or plain data"
        raise CheckpointLoadError(
            f"refusing to load {path}: it holds {what}, and unpickling it could run code. Checkpoints of "
            "karma train hold only tensors and plain data (older ones, with NumPy arrays, cannot be resumed)"
        ) from exc


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(config: TrainConfig | dict | str | Path, *, reward_source: RewardSource | None = None) -> Path:
    """Run a training job in this process; returns the output folder (final policy as an HF folder,
    metrics.jsonl, tensorboard/, checkpoints/). `config`: a TrainConfig, a nested dict, or a YAML path."""
    if isinstance(config, (str, Path)):
        config = TrainConfig.from_sources(config)
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    trainer = Trainer(config, reward_source=reward_source)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer.out
