"""How many CPU threads each process of a run takes when nobody says (an explicit setting always wins).

The rule, for a machine whose process may use `C` cores (`os.sched_getaffinity`, so a container's or
`taskset`'s limit counts, not the host's):

- a process that does the run's heavy work -- the trainer (its in-process vLLM engine shares the trainer's
  OpenMP pool: vLLM makes `torch.set_num_threads` a no-op once it has started, so the trainer sets the
  count before it starts vLLM), `karma rm train`, `karma eval`, the experiment's in-process stages -- takes
  all `C` (divided among the ranks when several data-parallel ranks share one CPU machine);
- the reward service the experiment starts beside the trainer takes `max(1, C // 4)`: during PPO it scores a
  step's replies while the trainer computes their log-probs, and its batches (a step's replies) are small,
  so a quarter of the cores keeps it from competing with the trainer's forward passes for every core.
  `karma serve` on its own keeps torch's default (all physical cores): there it is the heavy work.

On the 2-core development machine that is 2 threads for the trainer and 1 for the service; on an 8-core
laptop 8 and 2. Fixed `torch_threads: 1` in the shipped configs (measured once on a loaded shared machine)
left all but one core idle on an idle one; benchmarks/README.md has the comparison on an idle machine.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one, else the CPU count)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # macOS, Windows
        return max(os.cpu_count() or 1, 1)


def worker_threads(explicit: int | None = None, *, processes: int = 1) -> int:
    """Threads of a process doing the run's heavy work: `explicit` when set, else the usable cores divided
    among the `processes` that share them (data-parallel ranks on one CPU machine)."""
    return explicit or max(1, usable_cores() // max(processes, 1))


def service_threads(explicit: int | None = None) -> int:
    """Threads of a reward service running beside a trainer on the same machine: `explicit`, else C // 4."""
    return explicit or max(1, usable_cores() // 4)


def set_torch_threads(explicit: int | None = None, *, processes: int = 1) -> int:
    """`torch.set_num_threads(worker_threads(explicit, processes=processes))`; returns the count."""
    import torch

    n = worker_threads(explicit, processes=processes)
    torch.set_num_threads(n)
    return n
