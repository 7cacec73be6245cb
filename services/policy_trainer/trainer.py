"""The trainer: PPO / RLOO / GRPO of a causal LM against a `RewardSource`, rollouts from an engine.

`Trainer.fit()` is a loop over `train_step()`, and a step is a short sequence of named, timed phases:

    rollout     generate the batch; rewards of finished responses are requested as they finish
    logprobs    old log-probs, values (policy) and reference log-probs — while the rewards are in flight
    reward_wait block until the last reward arrived
    advantages  KL penalty, GAE (ppo) or group baselines (rloo / grpo)
    update      epochs x minibatches x micro-batches (gradient accumulation), clipped losses
    sync        load the new weights into the rollout engine
    log         the step's row in metrics.jsonl and TensorBoard (with `reward/version`, the reward model's
                version of the step's scores; a change between steps — a hot swap — is logged)
    checkpoint  every `save_every` steps (after the row: a kill between the two loses no row)

Each phase's seconds go to `timing/<phase>` (the checkpoint's to the log). A loss, PPO statistic or gradient
norm that is NaN or infinite stops the run with `TrainingDivergedError` before that gradient is applied. A
completed run ends with the held-out reward of base vs trained policy (`heldout.evaluate_heldout` →
heldout_reward.json); every run, failed ones included, writes trainer_result.json.

The class holds the loop; its parts have their own homes: the batch and the per-algorithm advantage / loss
assembly in `experience`, the math in `ppo_math`, checkpoints (state, RNG, resume) in `checkpoint`, metric
sinks and trainer_result.json in `sinks`, SIGINT / SIGTERM in `signals`. The LR schedule is transformers'
`get_scheduler` (its state is checkpointed), seeding `transformers.set_seed`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from services.policy_trainer import ppo_math as pm
from services.policy_trainer.build import (
    build_reward_source,
    load_prompts,
    load_tokenizer,
    optimizer_and_schedule,
    policy_eos_ids,
    start_vllm,
)
from services.policy_trainer.checkpoint import (
    CHECKPOINT_DIR,
    STATE_FILE,
    CheckpointLoadError,
    Checkpoints,
    get_rng_state,
    load_trainer_state,
    set_rng_state,
)
from services.policy_trainer.config import TrainConfig
from services.policy_trainer.engines import HFEngine, RolloutEngine
from services.policy_trainer.experience import (
    RolloutBatch,
    collect_scores,
    compute_advantages,
    generate_batch,
    micro_batch_loss,
    score_logprobs,
)
from services.policy_trainer.policy import Policy, check_policy_path
from services.policy_trainer.prompts import PromptSampler
from services.policy_trainer.rewards import RewardDispatcher, RewardSource, RewardUnavailableError
from services.policy_trainer.signals import StopRequested, StopSignals
from services.policy_trainer.sinks import MetricSinks, write_result

__all__ = [
    "CHECKPOINT_DIR",
    "STATE_FILE",
    "CheckpointLoadError",
    "PhaseTimer",
    "RolloutBatch",
    "Trainer",
    "TrainingDivergedError",
    "get_rng_state",
    "load_trainer_state",
    "set_rng_state",
    "train",
]

log = logging.getLogger(__name__)


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


class Trainer:
    """Build with a validated `TrainConfig`; `fit()` runs it. A `reward_source` may be injected (tests,
    benchmarks); otherwise it is built from the config's reward section."""

    def __init__(self, config: TrainConfig, *, reward_source: RewardSource | None = None):
        self.cfg = config
        self.out = Path(config.run.output_dir)
        self.checkpoints = Checkpoints(self.out / CHECKPOINT_DIR, config.run.keep_checkpoints)
        self._reward_source = reward_source
        self._ready = False
        self._stop = StopSignals()
        self.sinks: MetricSinks | None = None
        self.step = 0
        self.samples_seen = 0
        self.last_metrics: dict[str, Any] = {}
        self.reward_version: str | None = None  # the reward model's version in the latest step's row
        self._optimizer_steps_in_step = 0  # optimizer steps already taken by the step in progress

    # ================================================================================ set-up
    def setup(self) -> None:
        """Everything that can fail on bad input runs before any model loads, then the models load."""
        if self._ready:
            return
        from transformers import set_seed

        from karma.models import resolve_policy

        cfg, p = self.cfg, self.cfg.ppo
        if cfg.run.torch_threads:
            torch.set_num_threads(cfg.run.torch_threads)
        self.policy_path = resolve_policy(cfg.model.policy)
        check_policy_path(self.policy_path)
        self.rewards = RewardDispatcher(self._reward_source or build_reward_source(cfg.reward))
        self.rewards.wait_ready(cfg.reward.reward_ready_timeout_s)
        self.tokenizer = load_tokenizer(self.policy_path)
        self.prompts, self.heldout, self.heldout_source = load_prompts(
            cfg, self.tokenizer
        )  # rendered when drawn
        self.eos_ids = policy_eos_ids(self.tokenizer, self.policy_path)
        if cfg.run.resume and self.checkpoints.latest() is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.checkpoints.root}")
        if not cfg.run.resume and self.checkpoints.latest() is not None:
            raise FileExistsError(
                f"{self.out} already holds checkpoints of another run: pass --resume to continue "
                "it, or choose another output_dir"
            )
        self.out.mkdir(parents=True, exist_ok=True)

        self.engine: RolloutEngine | None = None
        if cfg.engine == "vllm":  # vLLM seeds the global RNGs when it starts: start it first, seed after
            self.engine = start_vllm(cfg, self.policy_path, self.eos_ids)
        set_seed(cfg.run.seed % 2**32)  # Python, NumPy (needs 0 <= seed < 2**32) and torch
        self.policy = Policy.load(cfg.model, self.policy_path, with_value_head=p.algo == "ppo")
        if self.engine is None:
            self.engine = HFEngine(self.policy, self.tokenizer, self.eos_ids)
        self.optimizer, self.scheduler = optimizer_and_schedule(
            [q for _, q in self.policy.trainable_named_parameters()], p, cfg.run.steps
        )
        self.kl_ctl = pm.KLController(p.kl_coef, p.kl_target, p.kl_horizon)
        self.sampler = PromptSampler(len(self.prompts), cfg.run.seed, cfg.data.shuffle)
        if cfg.run.resume:
            self._resume()
        self.sinks = MetricSinks(self.out, cfg.run.report_to, resume=cfg.run.resume, step=self.step)
        (self.out / "train_config.yaml").write_text(cfg.to_yaml())
        self._ready = True

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
                if self.cfg.run.save_every and not self.checkpoints.exists(self.step):
                    self.save_checkpoint()
                self.policy.save_pretrained(self.out, self.tokenizer)
        except (Exception, KeyboardInterrupt) as exc:
            newest = self.checkpoints.latest()
            write_result(
                self.out,
                {
                    "status": "failed",
                    "step": self.step,
                    "output_dir": str(self.out),
                    "error_type": type(exc).__name__,
                    "error": str(exc),
                    "checkpoint": str(newest) if newest else None,
                    "last_metrics": self.last_metrics,
                },
            )
            raise
        result = {
            "status": status,
            "step": self.step,
            "output_dir": str(self.out),
            "last_metrics": self.last_metrics,
        }
        write_result(self.out, result)
        if status == "completed" and len(self.heldout):
            from services.policy_trainer.heldout import evaluate_heldout

            result["heldout"] = evaluate_heldout(self)
        return result

    def _run_steps(self) -> str:
        """`train_step` until `steps` ("completed") or a stop signal (checkpoint, "stopped (SIGTERM)")."""
        with self._stop.installed():
            try:
                while self.step < self.cfg.run.steps:
                    self._stop.check()
                    self.train_step()
                    self._stop.check()
            except StopRequested:
                path = self.save_checkpoint()
                log.warning(
                    "stopped by %s at step %d; checkpoint %s (continue with --resume)",
                    self._stop.name,
                    self.step,
                    path,
                )
                return f"stopped ({self._stop.name})"
        return "completed"

    def train_step(self) -> dict[str, Any]:
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
                r = self.cfg.reward
                batch.scores = collect_scores(
                    batch.pending, batch.size, r.reward_deadline_s + r.reward_timeout_s + 30
                )
            version = self._note_reward_version()
            with timer("advantages"):
                metrics = self.compute_advantages(batch)
            with timer("update"):
                metrics |= self.update(batch)
        except RewardUnavailableError as exc:
            raise RewardUnavailableError(f"{exc} -- {self._stop_in_step(at_start)}") from exc
        except TrainingDivergedError as exc:
            raise TrainingDivergedError(
                f"{exc} -- {self._stop_in_step(at_start)}", step=exc.step, values=exc.values
            ) from exc
        with timer("sync"):
            self.engine.sync_weights(self.policy)
        self.step += 1
        self.samples_seen += batch.size
        step_s = time.perf_counter() - start
        metrics |= timer.metrics() | {
            "step": self.step,
            "samples": self.samples_seen,
            "speed/step_s": step_s,
            "speed/rollout_tokens_per_s": float(batch.response_mask.sum())
            / max(timer.seconds["rollout"], 1e-9),
            "speed/reward_wait_share": timer.seconds["reward_wait"] / step_s,
            "lr": self.scheduler.get_last_lr()[0],
            "reward/version": version,
        }
        self.sinks.write(self.step, metrics)  # before the checkpoint: resume drops rows after its step
        self.last_metrics = metrics
        if self.cfg.run.save_every and self.step % self.cfg.run.save_every == 0:
            t0 = time.perf_counter()
            path = self.save_checkpoint()
            log.info("checkpoint %s (%.1fs)", path, time.perf_counter() - t0)
        return metrics

    def _note_reward_version(self) -> str | None:
        """The reward model version of this step's scores (all arrived: none in flight); a change is logged
        (the reward model was hot-swapped since the previous step, or the first version is known)."""
        version = self.rewards.source.version
        if version != self.reward_version:
            if self.reward_version is None:
                log.info("reward model version %s (step %d)", version, self.step + 1)
            else:
                log.warning(
                    "reward model version changed from %s to %s at step %d (hot swap)",
                    self.reward_version,
                    version,
                    self.step + 1,
                )
            self.reward_version = version
        return version

    def _stop_in_step(self, at_start: dict[str, Any]) -> str:
        """The failed step's state for the error message. Before its first optimizer step the state is exactly
        that of the step's start once the prompt position and KL controller are rewound: saved as a checkpoint,
        so --resume redoes the step. After one, the weights are part-updated and not saved."""
        failed = self.step + 1
        if self._optimizer_steps_in_step:
            return (
                f"training stopped in step {failed} after {self._optimizer_steps_in_step} optimizer step(s) of "
                f"it; that state is not saved; newest checkpoint: {self.checkpoints.latest() or 'none'}"
            )
        self.sampler.load_state_dict(at_start["sampler"])
        self.kl_ctl.load_state_dict(at_start["kl_controller"])
        path = self.save_checkpoint()
        return f"training stopped before step {failed}; checkpoint saved to {path} (continue with --resume)"

    # ================================================================================ phases
    def rollout(self) -> RolloutBatch:
        """Sample `prompts_per_step` prompts x `samples_per_prompt` responses; request rewards as they finish."""
        p, r = self.cfg.ppo, self.cfg.rollout
        rows = [
            i for i in self.sampler.take(p.prompts_per_step) for _ in range(p.samples_per_prompt)
        ]  # grouped
        return generate_batch(
            self.engine,
            self.tokenizer,
            self.prompts,
            rows,
            self.rewards,
            seed=self._seed_for("generate"),
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
        )

    def score_logprobs(self, batch: RolloutBatch) -> None:
        """Old log-probs and values of the current policy, and the reference log-probs (micro-batched)."""
        score_logprobs(self.policy, batch, self.cfg.rollout.temperature, self.cfg.ppo.micro_batch_size)

    def compute_advantages(self, batch: RolloutBatch) -> dict[str, float]:
        """Fill `batch.advantages` (and `.returns`), then feed the step's KL to the KL controller."""
        batch.advantages, batch.returns, metrics = compute_advantages(batch, self.cfg.ppo, self.kl_ctl.value)
        self.kl_ctl.update(metrics["objective/kl"], batch.size)
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
                    mb = perm[start : start + p.mini_batch_size]
                    self.optimizer.zero_grad(set_to_none=True)
                    for m0 in range(0, len(mb), p.micro_batch_size):
                        idx = mb[m0 : m0 + p.micro_batch_size]
                        f = self.policy.forward_responses(
                            batch.input_ids[idx],
                            batch.attention_mask[idx],
                            batch.prompt_len,
                            self.cfg.rollout.temperature,
                            with_values=p.algo == "ppo",
                        )
                        loss, stats = micro_batch_loss(f, batch, idx, p, self.kl_ctl.value)
                        (loss / p.grad_accum_steps).backward()
                        stats["loss/total"] = loss.item()
                        self._check_finite(stats, where)
                        for k, v in stats.items():
                            sums[k] += v
                        n_micro += 1
                    grad_norm = float(
                        torch.nn.utils.clip_grad_norm_(
                            [q for _, q in self.policy.trainable_named_parameters()], p.max_grad_norm
                        )
                    )
                    self._check_finite({"policy/grad_norm": grad_norm}, where)
                    grad_norms.append(grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self._optimizer_steps_in_step += 1
        finally:
            self.policy.eval()
        return {k: v / n_micro for k, v in sums.items()} | {
            "policy/grad_norm": sum(grad_norms) / len(grad_norms)
        }

    def _check_finite(self, values: dict[str, float], where: str) -> None:
        check_finite(values, self.step + 1, where)

    def _seed_for(self, purpose: str) -> int:
        """A seed that depends only on (run seed, step, purpose): a resumed step draws the same numbers."""
        salt = {"generate": 1, "minibatch": 2}[purpose]
        return (self.cfg.run.seed * 1_000_003 + self.step * 7_919 + salt) % 2**31

    # ================================================================================ checkpoints
    def save_checkpoint(self) -> Path:
        """Trainable weights (policy or adapters, value head), optimizer, LR scheduler, KL controller, RNGs,
        prompt position, step and config (see `checkpoint`); older ones beyond `keep_checkpoints` removed."""
        return self.checkpoints.save(
            self.step,
            {
                "step": self.step,
                "samples_seen": self.samples_seen,
                "trainable": self.policy.trainable_state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "kl_controller": self.kl_ctl.state_dict(),
                "sampler": self.sampler.state_dict(),
                "rng": get_rng_state(),
                "config": self.cfg.to_dict(),
            },
        )

    def latest_checkpoint(self) -> Path | None:
        return self.checkpoints.latest()

    def _resume(self) -> None:
        path, state = self.checkpoints.load_latest()
        self.policy.load_trainable_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.engine.sync_weights(self.policy)
        log.info("resumed from %s (step %d)", path, self.step)

    def close(self) -> None:
        if self.sinks is not None:
            self.sinks.close()
        if hasattr(self, "rewards"):
            self.rewards.close()
        if getattr(self, "engine", None) is not None:
            self.engine.close()
            self.engine = None


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
