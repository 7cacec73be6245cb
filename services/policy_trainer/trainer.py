"""The trainer: PPO / RLOO / GRPO of a causal LM against a `RewardSource`, rollouts from an engine.

`Trainer.fit()` is a loop over `train_step()`, and a step is a short sequence of named, timed phases:

    rollout     generate the batch; rewards of finished responses are requested as they finish
    logprobs    old log-probs, values (policy) and reference log-probs — while the rewards are in flight
    reward_wait block until the last reward arrived
    gather      (data-parallel only) join the ranks' shares: every rank then holds the step's whole batch
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
sinks and trainer_result.json in `sinks`, SIGINT / SIGTERM in `signals`, data-parallel ranks in
`distributed` (under `accelerate launch` / `torchrun`: each rank rolls out its share of the step's prompts,
DDP averages the gradients, rank 0 writes; a dead peer is `RankFailedError`). The LR schedule is
transformers' `get_scheduler` (its state is checkpointed), seeding `transformers.set_seed`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from karma.threads import set_torch_threads
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
    restore_trainer_state,
    save_step_start,
    save_trainer_checkpoint,
    set_rng_state,
)
from services.policy_trainer.config import TrainConfig
from services.policy_trainer.distributed import Distributed, RankFailedError, check_batch_sizes
from services.policy_trainer.engines import HFEngine, RolloutEngine
from services.policy_trainer.experience import (
    RolloutBatch,
    TrainingDivergedError,
    check_finite,
    compute_advantages,
    gather_batch,
    generate_batch,
    score_logprobs,
    update_policy,
    wait_for_scores,
)
from services.policy_trainer.monitor import HackingMonitor, RewardHackingError, batch_stats
from services.policy_trainer.policy import Policy, check_policy_path
from services.policy_trainer.prompts import PromptSampler
from services.policy_trainer.rewards import RewardDispatcher, RewardSource, RewardUnavailableError
from services.policy_trainer.signals import StopRequested, StopSignals
from services.policy_trainer.sinks import MetricSinks, failed_result, note_reward_version, write_result

__all__ = [
    "CHECKPOINT_DIR",
    "STATE_FILE",
    "CheckpointLoadError",
    "PhaseTimer",
    "RankFailedError",
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


class Trainer:
    """Build with a validated `TrainConfig`; `fit()` runs it. A `reward_source` may be injected (tests,
    benchmarks); otherwise it is built from the config's reward section. `dist` (default: from the launcher's
    environment, one process without one) places this process in a data-parallel run."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        reward_source: RewardSource | None = None,
        dist: Distributed | None = None,
    ):
        self.cfg = config
        run = config.run
        self.dist = dist or Distributed.from_env(
            run.dist_timeout_s, device=run.device, row_seeded=config.rollout.row_seeded
        )
        self.monitor = HackingMonitor(config.monitor)
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

    # ================================================================================ set-up
    def setup(self) -> None:
        """Everything that can fail on bad input runs before any model loads, then the models load."""
        if self._ready:
            return
        from transformers import set_seed

        from karma.models import resolve_policy

        cfg, p, d = self.cfg, self.cfg.ppo, self.dist
        check_batch_sizes(p.batch_size, p.mini_batch_size, p.micro_batch_size, d.world_size)
        d.start()  # the process group (several ranks)
        if d.device.type == "cpu":  # before vLLM starts: it makes torch.set_num_threads a no-op after
            local = int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
            threads = set_torch_threads(cfg.run.torch_threads, processes=local)
            log.info(
                "torch threads: %d (%s)", threads, "run.torch_threads" if cfg.run.torch_threads else "auto"
            )
        elif cfg.run.torch_threads:
            torch.set_num_threads(cfg.run.torch_threads)
        self.policy_path = resolve_policy(cfg.model.policy)
        check_policy_path(self.policy_path)
        self.rewards = RewardDispatcher(
            self._reward_source or build_reward_source(cfg.reward, cfg.model.dtype)
        )
        self.rewards.wait_ready(cfg.reward.reward_ready_timeout_s)
        self.tokenizer = load_tokenizer(self.policy_path)
        self.prompts, self.heldout, self.heldout_source = load_prompts(
            cfg, self.tokenizer
        )  # rendered when drawn
        self.eos_ids = policy_eos_ids(self.tokenizer, self.policy_path)
        self.checkpoints.check_run_folder(cfg.run.resume)
        self.out.mkdir(parents=True, exist_ok=True)

        self.engine: RolloutEngine | None = None
        self.heldout_base = None  # the base policy's held-out replies (heldout.prepare_base_replies)
        if cfg.engine == "vllm":  # vLLM seeds the global RNGs when it starts: start it first, seed after
            self.engine = start_vllm(cfg, self.policy_path, self.eos_ids)
        set_seed(cfg.run.seed % 2**32)  # Python, NumPy (needs 0 <= seed < 2**32) and torch
        self.policy = Policy.load(cfg.model, self.policy_path, with_value_head=p.algo == "ppo").to(d.device)
        if self.engine is None:
            self.engine = HFEngine(self.policy, self.tokenizer, self.eos_ids)
        self.optimizer, self.scheduler = optimizer_and_schedule(
            [q for _, q in self.policy.trainable_named_parameters()], p, cfg.run.steps
        )
        self.kl_ctl = pm.KLController(p.kl_coef, p.kl_target, p.kl_horizon)
        self.sampler = PromptSampler(len(self.prompts), cfg.run.seed, cfg.data.shuffle)
        if cfg.run.resume:
            self._resume()
        self.model = d.wrap(self.policy)  # DDP with several ranks: the update's forward goes through it
        if d.is_main:
            self.sinks = MetricSinks(self.out, cfg.run.report_to, resume=cfg.run.resume, step=self.step)
            (self.out / "train_config.yaml").write_text(cfg.to_yaml())
        d.barrier("set-up (every rank loaded its models)")
        self._ready = True

    # ================================================================================ the loop
    def fit(self) -> dict[str, Any]:
        """Train until `steps` or a stop signal (checkpoint, then return); a completed run then measures its
        held-out reward. A failure after set-up — `RewardUnavailableError`, `TrainingDivergedError` or
        `RankFailedError` (each checkpoints first when the state is exactly that of a step's start), or
        anything else — writes trainer_result.json with status "failed", then re-raises. Returns {'status',
        'step', 'output_dir', 'last_metrics'} (+ 'heldout', the content of heldout_reward.json). With several
        ranks only rank 0 writes files and measures the held-out reward."""
        self.setup()
        main = self.dist.is_main
        try:
            if main and len(self.heldout) and self.dist.world_size == 1:
                from services.policy_trainer.heldout import prepare_base_replies

                self.heldout_base = prepare_base_replies(self)  # before the first update
            status = self._run_steps()
            if status == "completed":
                saved = self.dist.gather_objects(self.checkpoints.exists(self.step), "the final checkpoint")
                if self.cfg.run.save_every and not saved[0]:  # rank 0's view decides, on every rank
                    self.save_checkpoint()
                if main:
                    self.policy.save_pretrained(self.out, self.tokenizer)
        except (Exception, KeyboardInterrupt) as exc:
            if main:
                latest = self.checkpoints.latest()
                write_result(self.out, failed_result(self.out, self.step, exc, latest, self.last_metrics))
            raise
        result = {
            "status": status,
            "step": self.step,
            "output_dir": str(self.out),
            "last_metrics": self.last_metrics,
        }
        if main:
            write_result(self.out, result)
        if main and status == "completed" and len(self.heldout):
            from services.policy_trainer.heldout import evaluate_heldout

            result["heldout"] = evaluate_heldout(self)
        return result

    def _run_steps(self) -> str:
        """`train_step` until `steps` ("completed") or a stop signal (checkpoint, "stopped (SIGTERM)")."""
        with self._stop.installed():
            try:
                while self.step < self.cfg.run.steps:
                    self._check_stop()
                    self.train_step()
                    self._check_stop()
            except StopRequested:
                path = self.save_checkpoint()
                name = self._stop.name or "a signal to another rank"
                log.warning(
                    "stopped by %s at step %d; checkpoint %s (continue with --resume)", name, self.step, path
                )
                return f"stopped ({name})"
        return "completed"

    def _check_stop(self) -> None:
        """`StopRequested` when a signal reached this process or (data-parallel) any rank; a dead peer here,
        between steps, is a `RankFailedError` after rank 0 saved the step's state (unless already saved)."""
        try:
            stop = self.dist.any(self._stop.name is not None, "agreeing on a stop signal")
        except RankFailedError as exc:
            if self.step and not self.checkpoints.exists(self.step):
                self.save_checkpoint(gather=False)
            raise RankFailedError(f"{exc} -- newest checkpoint: {self.checkpoints.latest()}") from exc
        if stop:
            raise StopRequested

    def train_step(self) -> dict[str, Any]:
        """One rollout + update; logs the step's metrics, then checkpoints (every `save_every` steps)."""
        timer = PhaseTimer()
        start = time.perf_counter()
        at_start = {
            "sampler": self.sampler.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "optimizer_steps": self.scheduler.last_epoch,  # the scheduler steps with every optimizer step
        }
        try:
            with timer("rollout"):
                batch = self.rollout()
            with timer("logprobs"):
                self.score_logprobs(batch)
            with timer("reward_wait"):
                r = self.cfg.reward
                failure = wait_for_scores(
                    batch, r.reward_deadline_s + r.reward_timeout_s + 30, defer=self.dist.enabled
                )
            if self.dist.parallel_layout:
                with timer("gather"):
                    batch = gather_batch(batch, self.dist, failure)
            version = self.rewards.source.version  # of this step's scores: all arrived
            note_reward_version(log, self.reward_version, version, self.step + 1)
            self.reward_version = version
            with timer("advantages"):
                metrics = self.compute_advantages(batch)
                metrics |= self.watch(batch, metrics["objective/kl"])
            with timer("update"):
                metrics |= self.update(batch)
        except RewardUnavailableError as exc:
            raise RewardUnavailableError(f"{exc} -- {save_step_start(self, at_start)}") from exc
        except TrainingDivergedError as exc:
            raise TrainingDivergedError(
                f"{exc} -- {save_step_start(self, at_start)}", step=exc.step, values=exc.values
            ) from exc
        except RewardHackingError as exc:  # before the update: the step's start is saved, --resume redoes it
            raise RewardHackingError(
                exc.step, exc.alarms, f"{exc} -- {save_step_start(self, at_start)}"
            ) from exc
        except RankFailedError as exc:  # no collective can run now: rank 0 saves without the others
            raise RankFailedError(f"{exc} -- {save_step_start(self, at_start, gather=False)}") from exc
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
        if self.sinks is not None:  # before the checkpoint: resume drops rows after its step
            self.sinks.write(self.step, metrics)
        self.last_metrics = metrics
        if self.cfg.run.save_every and self.step % self.cfg.run.save_every == 0:
            t0 = time.perf_counter()
            path = self.save_checkpoint()
            log.info("checkpoint %s (%.1fs)", path, time.perf_counter() - t0)
        return metrics

    # ================================================================================ phases
    def rollout(self) -> RolloutBatch:
        """Sample `prompts_per_step` prompts x `samples_per_prompt` responses (this rank's share of them);
        request rewards as they finish."""
        p, r = self.cfg.ppo, self.cfg.rollout
        rows = [
            i for i in self.sampler.take(p.prompts_per_step) for _ in range(p.samples_per_prompt)
        ]  # grouped
        return generate_batch(
            *(self.engine, self.tokenizer, self.prompts, rows, self.rewards),
            seed=self._seed_for("generate"),
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            dist=self.dist,
        ).to(self.dist.device)

    def score_logprobs(self, batch: RolloutBatch) -> None:
        """Old log-probs and values of the current policy, and the reference log-probs (micro-batched)."""
        score_logprobs(self.policy, batch, self.cfg.rollout.temperature, self.cfg.ppo.micro_batch_size)

    def compute_advantages(self, batch: RolloutBatch) -> dict[str, float]:
        """Fill `batch.advantages` (and `.returns`), then feed the step's KL to the KL controller."""
        batch.advantages, batch.returns, metrics = compute_advantages(batch, self.cfg.ppo, self.kl_ctl.value)
        self.kl_ctl.update(metrics["objective/kl"], batch.size)
        return metrics

    def watch(self, batch: RolloutBatch, kl: float) -> dict[str, float]:
        """The reward-hacking monitor's figures of the step's batch (`monitor/*`); an alarm warns
        `RewardHackingWarning`, or with `monitor.alarm_stop` raises `RewardHackingError` (every rank holds the
        whole batch here, so every rank trips alike)."""
        stats = batch_stats(batch.scores.tolist(), batch.responses, kl)
        tripped = self.monitor.update(self.step + 1, stats)
        return stats.metrics() | {"monitor/alarms": float(len(tripped))}

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """`epochs` passes of shuffled minibatches, one optimizer step each (`experience.update_policy`; with
        several ranks each trains on its share of every minibatch and DDP averages the gradients)."""
        return update_policy(
            *(self.model, self.policy, self.optimizer, self.scheduler, batch, self.cfg.ppo),
            kl_coef=self.kl_ctl.value,
            temperature=self.cfg.rollout.temperature,
            seed=self._seed_for("minibatch"),
            step=self.step + 1,
            dist=self.dist,
        )

    def _check_finite(self, values: dict[str, float], where: str) -> None:
        check_finite(values, self.step + 1, where)

    def _seed_for(self, purpose: str) -> int:
        """A seed that depends only on (run seed, step, purpose): a resumed step draws the same numbers."""
        salt = {"generate": 1, "minibatch": 2}[purpose]
        return (self.cfg.run.seed * 1_000_003 + self.step * 7_919 + salt) % 2**31

    # ================================================================================ checkpoints
    def save_checkpoint(self, *, gather: bool = True) -> Path | None:
        """Weights, optimizer, LR scheduler, KL controller, RNGs, prompt position, step and config
        (`checkpoint.save_trainer_checkpoint`); older ones beyond `keep_checkpoints` removed."""
        return save_trainer_checkpoint(self, gather=gather)

    def _resume(self) -> None:
        path, state = self.checkpoints.load_latest()
        restore_trainer_state(self, state)
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
        self.dist.close()


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
