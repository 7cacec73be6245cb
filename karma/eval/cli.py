"""`karma eval` (evaluate one policy) and `karma eval compare` (base vs trained policies).

karma eval --model PATH --suite pragmatics,side_effects,factuality --limit 50 --out runs/eval/base
karma eval compare runs/eval/base runs/eval/ppo_full runs/eval/ppo_context --out runs/eval/compare
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from karma.config import command, parameter
from karma.eval.run import PolicyEvalConfig

ENV_PREFIX = "KARMA_EVAL_"

app = typer.Typer(invoke_without_command=True, no_args_is_help=False, pretty_exceptions_enable=False)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def evaluate(cfg: PolicyEvalConfig, ctx: typer.Context) -> None:
    """Pragmatics, side-effect and factuality evaluation of a causal LM (see `compare` for base vs trained)."""
    if ctx.invoked_subcommand is not None:
        return
    if cfg.out is None:
        raise _fail("--out DIR is required (or use `karma eval compare ...`)")
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    from karma.client import RewardServiceError
    from karma.eval.run import run_eval
    from karma.eval.scoring import NotACausalLMError
    from karma.eval.tasks import TaskSchemaError, UnknownSuiteError
    from karma.models import ModelNotFoundError

    try:
        results = run_eval(**cfg.run_kwargs())
    except (
        TaskSchemaError,
        UnknownSuiteError,
        NotACausalLMError,
        ModelNotFoundError,
        FileNotFoundError,
        RewardServiceError,
    ) as e:
        raise _fail(str(e)) from e
    _print_summary(results, cfg.out)


app.callback()(
    command(
        PolicyEvalConfig,
        evaluate,
        prefix=ENV_PREFIX,
        help=evaluate.__doc__,
        extra=[parameter("ctx", typer.Context)],
    )
)


def _print_summary(results: dict, out: Path) -> None:
    from karma.eval.report import fmt_ci

    for r in results["summary"]:
        for m, v in r["metrics"].items():
            typer.echo(f"{r['row']:<40} {m:<14} {fmt_ci(v):<28} n={v['n']}")
    typer.echo(f"wrote {out / 'results.json'}, {out / 'report.md'} ({results['timing']['total_s']:.0f} s)")


@app.command("compare")
def compare_cmd(
    base: Annotated[Path, typer.Argument(help="results folder (or results.json) of the base policy")],
    trained: Annotated[list[Path], typer.Argument(help="results folders of one or more trained policies")],
    out: Annotated[Path, typer.Option(help="output folder: compare.md, compare.json, compare.png")],
    name: Annotated[
        list[str] | None, typer.Option(help="label per trained policy (default: folder name)")
    ] = None,
    n_boot: Annotated[int, typer.Option(min=100)] = 1000,
    n_perm: Annotated[int, typer.Option(min=100, help="permutations per paired test")] = 10000,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Per-task deltas (trained - base) with paired-bootstrap CIs and paired tests: one table, one plot."""
    from karma.eval.comparison import compare

    try:
        result = compare(base, *trained, out=out, names=name or None, n_boot=n_boot, n_perm=n_perm, seed=seed)
    except (FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from e
    sys.stdout.write((out / "compare.md").read_text())
    typer.echo(
        f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'} "
        f"({len(result['rows'])} rows)"
    )
