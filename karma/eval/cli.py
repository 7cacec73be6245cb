"""`karma eval` (evaluate one policy) and `karma eval compare` (base vs trained policies).

karma eval --model PATH --suite pragmatics,side_effects,factuality --limit 50 --out runs/eval/base
karma eval compare runs/eval/base runs/eval/ppo_full runs/eval/ppo_context --out runs/eval/compare
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(invoke_without_command=True, no_args_is_help=False, pretty_exceptions_enable=False)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


@app.callback()
def evaluate(
    ctx: typer.Context,
    model: Annotated[
        str, typer.Option(help="causal LM folder (full or LoRA adapter), hub id, or 'smollm2'")
    ] = "smollm2",
    suite: Annotated[
        str | None,
        typer.Option(
            help="comma-separated suites (pragmatics, side_effects, factuality, all) and/or task names "
            "[default: pragmatics,side_effects,factuality; none when --task is given]"
        ),
    ] = None,
    task: Annotated[
        list[Path] | None,
        typer.Option(
            help="a BIG-bench task by path (task.json, another .json in its format, or a folder holding task.json); "
            "repeatable; evaluated beside --suite, or alone"
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="first N items of each task (smoke runs)")] = None,
    task_limit: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=N or NAME=all: items of one task, family or subtask, overriding --limit; repeatable"
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output folder: results.json, report.md, *.png")] = None,
    reward_url: Annotated[
        str | None,
        typer.Option(
            envvar="KARMA_REWARD_URL",
            help="reward service URL(s), comma-separated, to score generated replies",
        ),
    ] = None,
    reward_api_key: Annotated[
        str | None, typer.Option(envvar="KARMA_REWARD_API_KEY", help="bearer token")
    ] = None,
    reward_model: Annotated[
        str | None, typer.Option(help="model name on a multi-model reward service")
    ] = None,
    reward_normalize: Annotated[bool, typer.Option(help="ask the service for normalised scores")] = False,
    prompts: Annotated[
        Path | None,
        typer.Option(
            help="held-out prompts for the generation metrics: one per line, or .jsonl with a 'prompt' field "
            "(default: the politeness-corpus hold-out)"
        ),
    ] = None,
    n_prompts: Annotated[int, typer.Option(min=1, help="prompts taken from the default hold-out")] = 32,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="KARMA_SHARED_DATA", help="shared data folder holding eval/ (default ../shared/data)"
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="(prompt, option) pairs per forward pass")] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")
    ] = "auto",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    gen_batch_size: Annotated[int, typer.Option(min=1, help="prompts per generate() call")] = 16,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.9,
    chat_template: Annotated[
        bool | None,
        typer.Option(
            "--chat-template/--no-chat-template",
            help="wrap generation prompts in the chat template (default: if any)",
        ),
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch CPU threads (default: torch's choice)")
    ] = None,
    n_boot: Annotated[int, typer.Option(min=100, help="bootstrap resamples per CI")] = 1000,
    progress: Annotated[bool, typer.Option(help="progress bars")] = True,
) -> None:
    """Pragmatics, side-effect and factuality evaluation of a causal LM (see `compare` for base vs trained)."""
    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        raise _fail("--out DIR is required (or use `karma eval compare ...`)")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise _fail(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from karma.client import RewardServiceError
    from karma.eval.run import run_eval
    from karma.eval.scoring import NotACausalLMError
    from karma.eval.tasks import TaskSchemaError, UnknownSuiteError
    from karma.models import ModelNotFoundError

    try:
        limits = _task_limits(task_limit or [])
    except ValueError as e:
        raise _fail(str(e)) from e
    try:
        results = run_eval(
            model,
            suite,
            limit,
            out,
            reward_url,
            prompts,
            task_paths=task or [],
            task_limits=limits,
            data_dir=data_dir,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            n_prompts=n_prompts,
            max_new_tokens=max_new_tokens,
            gen_batch_size=gen_batch_size,
            temperature=temperature,
            top_p=top_p,
            chat_template=chat_template,
            reward_api_key=reward_api_key,
            reward_model=reward_model,
            reward_normalize=reward_normalize,
            seed=seed,
            n_boot=n_boot,
            progress=progress,
        )
    except (
        TaskSchemaError,
        UnknownSuiteError,
        NotACausalLMError,
        ModelNotFoundError,
        FileNotFoundError,
        RewardServiceError,
    ) as e:
        raise _fail(str(e)) from e
    _print_summary(results, out)


def _task_limits(specs: list[str]) -> dict[str, int | None]:
    """`--task-limit implicatures=200 --task-limit social_iqa=all` -> {"implicatures": 200, "social_iqa": None}."""
    out: dict[str, int | None] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        value = value.strip()
        if not sep or not name.strip() or not (value == "all" or (value.isdigit() and int(value) >= 1)):
            raise ValueError(f"--task-limit {spec!r}: expected NAME=N (N >= 1) or NAME=all")
        out[name.strip()] = None if value == "all" else int(value)
    return out


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
