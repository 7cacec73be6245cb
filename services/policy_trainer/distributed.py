"""Data-parallel training: which rank does what, and the few collectives the trainer needs.

`accelerate launch --multi_gpu --num_processes N -m karma.cli train ...` (or `torchrun --nproc-per-node N`)
starts N copies of `karma train`; each reads its rank from the launcher's environment (`RANK`, `WORLD_SIZE`,
`LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`). `Distributed.from_env()` describes that; `start()` opens the
process group (gloo on CPU, NCCL on CUDA) with a timeout, so a rank that stops answering is an error, not a
hang. Without a launcher (`WORLD_SIZE` unset or 1) nothing here communicates and the trainer runs exactly
as a plain single process.

The layout of a step with W ranks (B = prompts_per_step x samples_per_prompt responses, M = mini_batch_size,
m = micro_batch_size, all global except m, which is per rank):

- every rank draws the same B rows from its replicated prompt sampler; rank r rolls out and scores the
  contiguous share `shard_bounds(B, r, W)`, each row sampled with its own seed (seed, step, row), so the
  union of the shares is the batch a row-seeded single process samples;
- the shares are padded to the step's global prompt / response widths and gathered in rank order: every
  rank then holds the whole batch, so advantages, whitening and group baselines see exactly the
  single-process batch;
- the update shuffles the B rows with the same seed on every rank; rank r trains on its share of each
  minibatch (`shard_bounds(M, r, W)`) in micro-batches of m, and DDP averages the gradients: the mean
  gradient of the same micro-batches a single process would use;
- rank 0 writes metrics, checkpoints, trainer_result.json and the final policy.

A collective that fails because a peer died (gloo: "Connection closed by peer") or did not answer within the
timeout raises `RankFailedError`.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

#: seconds a collective waits for the other ranks before `RankFailedError` (a rank may be busy this long:
#: the slowest rank's rollout, or rank 0's checkpoint)
DEFAULT_TIMEOUT_S = 1800.0


class RankFailedError(RuntimeError):
    """Another rank of a data-parallel run died or stopped answering within the timeout: this rank stops."""


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank `rank`'s contiguous share of n items; n must be divisible by `world_size`."""
    if n % world_size:
        raise ValueError(f"{n} items cannot be split evenly across {world_size} ranks")
    share = n // world_size
    return rank * share, (rank + 1) * share


def check_batch_sizes(batch_size: int, mini_batch_size: int, micro_batch_size: int, world_size: int) -> None:
    """`ValueError` unless each rank gets an equal share of the rollout batch and of every minibatch, in
    whole micro-batches (so the ranks' micro-batches are exactly those of a single process)."""
    if world_size == 1:
        return
    if batch_size % world_size:
        raise ValueError(
            f"rollout batch (prompts_per_step * samples_per_prompt = {batch_size}) must be divisible by the "
            f"number of processes ({world_size})"
        )
    if mini_batch_size % (world_size * micro_batch_size):
        raise ValueError(
            f"mini_batch_size ({mini_batch_size}) must be divisible by the number of processes x "
            f"micro_batch_size ({world_size} x {micro_batch_size}): each rank trains on an equal share of "
            "every minibatch, in whole micro-batches"
        )


def merge_stats(per_rank: Sequence[tuple[dict[str, float], int]]) -> tuple[dict[str, float], int]:
    """(sum of each statistic, number of micro-batches) over ranks, from each rank's (sums, count)."""
    sums: dict[str, float] = {}
    count = 0
    for rank_sums, n in per_rank:
        for k, v in rank_sums.items():
            sums[k] = sums.get(k, 0.0) + v
        count += n
    return sums, count


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


@dataclass
class Distributed:
    """This process's place in a data-parallel run. `row_seeded` forces the data-parallel rollout layout
    (rows sampled with their own seeds) in a single process: the run a W-rank run is compared with."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    row_seeded: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _started: bool = field(default=False, init=False, repr=False)

    @classmethod
    def from_env(
        cls, timeout_s: float = DEFAULT_TIMEOUT_S, *, device: str = "auto", row_seeded: bool = False
    ) -> Distributed:
        """Rank and world size from the launcher (`accelerate launch`, `torchrun`); one process without.
        `device`: auto = this rank's GPU when CUDA is available and accelerate was not told `--cpu`
        (`ACCELERATE_USE_CPU`), else the CPU; `cpu` / `cuda` force one."""
        world = _env_int("WORLD_SIZE", 1)
        rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
        use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("run.device is cuda but torch sees no CUDA device")
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available() and not use_cpu)
        where = torch.device("cuda", local) if cuda else torch.device("cpu")
        return cls(rank, world, local, timeout_s, row_seeded=row_seeded, device=where)

    @property
    def enabled(self) -> bool:
        """True when this process is one of several ranks."""
        return self.world_size > 1

    @property
    def parallel_layout(self) -> bool:
        """True when the step uses the data-parallel layout (several ranks, or `row_seeded`)."""
        return self.enabled or self.row_seeded

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    # ------------------------------------------------------------------------------------------ set-up
    def start(self) -> None:
        """Open the process group (once); on other ranks than 0 the trainer's INFO logs are silenced."""
        if not self.enabled or self._started:
            return
        import torch.distributed as dist

        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
            raise ValueError(
                "FSDP is not supported by karma train yet (the policy, its reference and the rollout engine "
                "need full weights on every rank); use DDP: accelerate launch --multi_gpu without --use_fsdp"
            )
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        with self.collective("init_process_group"):
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=self.timeout_s))
        self._started = True
        if not self.is_main:
            logging.getLogger("services.policy_trainer").setLevel(logging.WARNING)
        log.info("data-parallel: %d processes (%s, timeout %.0fs)", self.world_size, backend, self.timeout_s)

    def close(self) -> None:
        if self._started:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._started = False

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turn a failed collective (a peer died, or the timeout passed) into `RankFailedError`."""
        try:
            yield
        except RuntimeError as exc:
            if not self.enabled or isinstance(exc, RankFailedError):
                raise
            raise RankFailedError(
                f"{what} failed on {self.describe()}: another rank died or did not answer within "
                f"{self.timeout_s:.0f}s ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"
            ) from exc

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` wrapped in DistributedDataParallel (several ranks), else `module` itself."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        with self.collective("broadcasting the initial weights"):
            return DistributedDataParallel(
                module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True,
            )

    # ------------------------------------------------------------------------------------------ collectives
    def shard(self, n: int) -> tuple[int, int]:
        return shard_bounds(n, self.rank, self.world_size)

    def max_int(self, value: int, what: str) -> int:
        """The largest `value` over ranks."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.long, device=self.device)
        with self.collective(what):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def any(self, flag: bool, what: str) -> bool:
        """True when `flag` is true on any rank."""
        return bool(self.max_int(int(flag), what)) if self.enabled else flag

    def gather_objects(self, obj: Any, what: str) -> list[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable plain data)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        with self.collective(what):
            dist.all_gather_object(out, obj)
        return out

    def gather_rows(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """The ranks' `t` (equal shapes) concatenated along dim 0 in rank order, on every rank."""
        if not self.enabled:
            return t
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        with self.collective(what):
            dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def barrier(self, what: str) -> None:
        if self.enabled:
            import torch.distributed as dist

            with self.collective(what):
                dist.barrier()

    @contextmanager
    def micro_step(self, model: torch.nn.Module, sync: bool) -> Iterator[None]:
        """Around the forward and backward of one micro-batch: with several ranks DDP all-reduces the
        gradients only when `sync` (this rank's last micro-batch of a minibatch), and a failed all-reduce is
        `RankFailedError`."""
        if not self.enabled:
            yield
        elif not sync:
            with model.no_sync():
                yield
        else:
            with self.collective("all-reducing the gradients"):
                yield
