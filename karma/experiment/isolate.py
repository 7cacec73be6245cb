"""Run one experiment stage in a process of its own, so that what it loads (a reward model under training, the
policy with its vLLM engine and optimizer, an evaluated model, torch's allocator caches) is returned to the OS
when the stage ends instead of staying in the experiment's process for the stages after it.

`run_isolated(fn, *args)` starts a fresh interpreter (`spawn`: nothing of this process's torch / vLLM / OpenMP
state is inherited), calls `fn(*args)` there with this process's logging level and format, and returns its
result; an exception in the stage is re-raised here (its type and message), and a stage process that dies
without answering (killed, out of memory) raises `StageProcessError` with its exit code. The child is not
daemonic: a stage may start processes of its own (the data stage's decode workers).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# glibc's malloc keeps what a process frees for reuse instead of returning it, so a stage's resident memory
# stays at its high-water marks: every thread that allocates gets an arena of its own (up to 8 per core), and
# tensors up to 32 MB come from those arenas once the first large one is freed (the threshold adapts upward).
# Two arenas, and every block from 256 KiB up mapped on its own (returned to the OS when the tensor is freed),
# took the PPO process of the demo from 3.9 to 3.? GB here (benchmarks/README.md). A user's setting wins.
STAGE_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "262144"}


def stage_env() -> dict[str, str]:
    """The environment for a stage's (or the reward service's) process: this one's, plus `STAGE_ENV`
    where it does not set them."""
    return {**STAGE_ENV, **os.environ}


@contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """`os.environ` is `env` while a spawned child copies it (spawn takes no env argument)."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


class StageProcessError(RuntimeError):
    """A stage's process ended without a result (killed by a signal, out of memory, or an unpicklable error)."""


def _portable(exc: BaseException) -> BaseException:
    """`exc` when it survives pickling both ways (an exception whose __init__ takes other arguments than its
    args does not), else a `StageProcessError` naming its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except (pickle.PicklingError, TypeError, AttributeError, ValueError):
        return StageProcessError(f"{type(exc).__name__}: {exc}")


def _child(conn, fn: Callable[..., Any], args: tuple, level: int) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT)
    try:
        result = ("ok", fn(*args))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent, which re-raises it
        result = ("error", _portable(exc), traceback.format_exc())
    try:
        conn.send(result)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:  # an unpicklable result
        conn.send(("error", StageProcessError(f"{fn.__name__} returned what cannot be sent back: {exc}"), ""))
    finally:
        conn.close()


def run_isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a fresh process; its return value (picklable) or its exception."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child, args=(send, fn, args, logging.getLogger().getEffectiveLevel()), daemon=False
    )
    with _environ(stage_env()):
        proc.start()
    send.close()
    try:
        try:
            reply = receive.recv()
        except EOFError:
            proc.join()
            raise StageProcessError(
                f"the stage process {getattr(fn, '__name__', fn)} exited with code {proc.exitcode} without a "
                "result (killed, or out of memory?)"
            ) from None
    except BaseException:
        if proc.is_alive():  # Ctrl-C or an error here: do not leave the stage running
            proc.terminate()
        proc.join()
        raise
    proc.join()
    if reply[0] == "error":
        _, exc, tb = reply
        if tb:
            exc.add_note(f"in the stage process ({getattr(fn, '__name__', fn)}):\n{tb.rstrip()}")
        raise exc
    return reply[1]
