"""The trainer's checkpoints: `OUTPUT_DIR/checkpoints/step-NNNNNN/trainer_state.pt`.

A state is tensors and plain data only — trainable weights, optimizer, LR scheduler, KL controller, prompt
sampler, RNG states (as lists, not NumPy arrays), step, config — so `--resume` loads it with
`torch.load(weights_only=True)`: a crafted file that would run code on unpickling is refused
(`CheckpointLoadError`) without being run. Writes are atomic (a temporary folder renamed into place); the newest
`keep` checkpoints are kept.
"""

from __future__ import annotations

import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
