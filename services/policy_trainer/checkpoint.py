"""The trainer's checkpoints: `OUTPUT_DIR/checkpoints/step-NNNNNN/trainer_state.pt`.

A state is tensors and plain data only — trainable weights, optimizer, LR scheduler, KL controller, prompt
sampler, RNG states (as lists, not NumPy arrays), step, config — so `--resume` loads it with
`torch.load(weights_only=True)`: a crafted file that would run code on unpickling is refused
(`CheckpointLoadError`) without being run. Writes are atomic (a temporary folder renamed into place); the newest
`keep` checkpoints are kept.

Data-parallel runs: the replicas are equal, so rank 0 writes the one state; it adds `rng_ranks` (every rank's
RNG states, gathered) and `world_size`, and every rank loads the same file on resume, restoring its own RNG
states when the world size is the same (rank 0's otherwise, and when a failed peer left none).
"""

from __future__ import annotations

import pickle
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from services.policy_trainer.trainer import Trainer

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"


class CheckpointLoadError(ValueError):
    """A checkpoint that holds something other than tensors and plain data; refused without running it."""


class Checkpoints:
    """The checkpoints of one run: `root` is `OUTPUT_DIR/checkpoints`; at most the newest `keep` are kept."""

    def __init__(self, root: Path, keep: int):
        self.root, self.keep = root, keep

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:06d}"

    def exists(self, step: int) -> bool:
        return (self.path(step) / STATE_FILE).exists()

    def check_run_folder(self, resume: bool) -> None:
        """`--resume` needs a checkpoint (`FileNotFoundError`); a fresh run refuses a folder that holds the
        checkpoints of another run (`FileExistsError`)."""
        if resume and self.latest() is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.root}")
        if not resume and self.latest() is not None:
            raise FileExistsError(
                f"{self.root.parent} already holds checkpoints of another run: pass --resume to continue "
                "it, or choose another output_dir"
            )

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder (one with a state file), or None."""
        found = sorted(d for d in self.root.glob("step-*") if (d / STATE_FILE).exists())
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write `state` as step `step`, atomically; remove the ones older than the newest `keep`."""
        final, tmp = self.path(step), self.root / f".tmp-step-{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(state, tmp / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        kept = sorted(d for d in self.root.glob("step-*") if (d / STATE_FILE).exists())
        for old in kept[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_latest(self) -> tuple[Path, dict[str, Any]]:
        """(folder, state) of the newest checkpoint; `FileNotFoundError` when there is none."""
        path = self.latest()
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.root}")
        return path, load_trainer_state(path / STATE_FILE)


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


def get_rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch RNG states as tensors and plain data (loadable with `weights_only=True`)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `get_rng_state` returned."""
    py, n = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
            "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
        }
    )
    torch.set_rng_state(state["torch"])


def trainer_state(trainer: Trainer, rng_ranks: list[dict[str, Any]] | None) -> dict[str, Any]:
    """What a checkpoint holds: trainable weights (policy or adapters, value head), optimizer, LR scheduler,
    KL controller, prompt position, RNG states (and each rank's, when gathered), step, config."""
    state = {
        "step": trainer.step,
        "samples_seen": trainer.samples_seen,
        "trainable": trainer.policy.trainable_state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "kl_controller": trainer.kl_ctl.state_dict(),
        "sampler": trainer.sampler.state_dict(),
        "rng": get_rng_state(),
        "config": trainer.cfg.to_dict(),
    }
    if trainer.dist.enabled:
        state |= {"world_size": trainer.dist.world_size, "rng_ranks": rng_ranks}
    return state


def restore_trainer_state(trainer: Trainer, state: dict[str, Any]) -> None:
    """Load a `trainer_state` into the trainer's policy, optimizer, schedules, sampler, RNGs and counters."""
    trainer.policy.load_trainable_state_dict(state["trainable"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.kl_ctl.load_state_dict(state["kl_controller"])
    trainer.sampler.load_state_dict(state["sampler"])
    ranks = state.get("rng_ranks")  # data-parallel checkpoints only
    same_world = ranks is not None and len(ranks) == trainer.dist.world_size
    set_rng_state(ranks[trainer.dist.rank] if same_world else state["rng"])
    trainer.step, trainer.samples_seen = state["step"], state["samples_seen"]


def save_trainer_checkpoint(trainer: Trainer, *, gather: bool = True) -> Path | None:
    """Write the trainer's state as its step's checkpoint (rank 0 writes; the path on every rank). With several
    ranks, `gather` first collects every rank's RNG states; when that fails (a peer died) rank 0 still saves,
    with its own, then `RankFailedError` is raised naming the checkpoint."""
    from services.policy_trainer.distributed import RankFailedError

    dist, rng_ranks, failed = trainer.dist, None, None
    if dist.enabled and gather:
        try:
            rng_ranks = dist.gather_objects(get_rng_state(), "gathering the ranks' RNG states")
        except RankFailedError as exc:
            failed = exc
    if not dist.is_main:  # rank 0 writes it; when a peer (perhaps rank 0) died, only the newest one is known
        return trainer.checkpoints.path(trainer.step) if gather else trainer.checkpoints.latest()
    path = trainer.checkpoints.save(trainer.step, trainer_state(trainer, rng_ranks))
    if failed is not None:
        raise RankFailedError(f"{failed} -- checkpoint saved to {path} (continue with --resume)") from failed
    return path


def save_step_start(trainer: Any, at_start: dict[str, Any], *, gather: bool = True) -> str:
    """The failed step's state for the error message. Before its first optimizer step the state is exactly
    that of the step's start once the prompt position and KL controller are rewound: saved as a checkpoint,
    so --resume redoes the step. After one, the weights are part-updated and not saved."""
    failed, done = trainer.step + 1, trainer.scheduler.last_epoch - at_start["optimizer_steps"]
    if done:
        return (
            f"training stopped in step {failed} after {done} optimizer step(s) of it; that state is not "
            f"saved; newest checkpoint: {trainer.checkpoints.latest() or 'none'}"
        )
    trainer.sampler.load_state_dict(at_start["sampler"])
    trainer.kl_ctl.load_state_dict(at_start["kl_controller"])
    path = trainer.save_checkpoint(gather=gather)
    return f"training stopped before step {failed}; checkpoint saved to {path} (continue with --resume)"
