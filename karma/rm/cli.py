"""`karma rm train | eval | compare` — the reward-model stage's commands (heavy imports inside each command)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True)

Data = Annotated[Path, typer.Option("--data", help="a `karma data prepare` output folder")]
Variant = Annotated[str, typer.Option("--variant", help="full | context | response (input template)")]
Objective = Annotated[str, typer.Option("--objective", help="regression | pairwise | both")]
Backbone = Annotated[
    str, typer.Option("--backbone", help="'minilm' (embedded default), a local HF folder or a hub id")
]
MaxLength = Annotated[
    int, typer.Option("--max-length", help="tokens per input; the context is cut from the left")
]
Epochs = Annotated[float, typer.Option("--epochs")]
MaxSteps = Annotated[
    int, typer.Option("--max-steps", help="stop after N optimizer steps (-1: --epochs decides)")
]
BatchSize = Annotated[int, typer.Option("--batch-size", help="pairs (or replies) per step")]
GradAccum = Annotated[int, typer.Option("--grad-accum", help="gradient accumulation steps")]
LR = Annotated[float, typer.Option("--lr", help="peak learning rate (AdamW, linear schedule, 10% warm-up)")]
MaxTrain = Annotated[
    int, typer.Option("--max-train", help="subsample N training items (ignored with --full)")
]
Full = Annotated[
    bool, typer.Option("--full", help="use every training item (hours on a CPU) instead of subsampling")
]
Patience = Annotated[int, typer.Option("--patience", help="early stopping: evaluations without improvement")]
EvalSteps = Annotated[int, typer.Option("--eval-steps", help="steps between validations (0: four per run)")]
Margin = Annotated[
    float, typer.Option("--margin-scale", help="pairwise margin = scale * log(score_ratio); 0 = off")
]
RegWeight = Annotated[
    float, typer.Option("--regression-weight", help="`both`: weight of the regression loss")
]
RegLoss = Annotated[str, typer.Option("--regression-loss", help="huber | mse")]
Seed = Annotated[int, typer.Option("--seed")]
Threads = Annotated[int, typer.Option("--threads", help="torch threads (0: torch's default)")]
TrainSub = Annotated[
    str, typer.Option("--train-subreddit", help="train on this subreddit only (transfer study)")
]
MaxEx = Annotated[
    int,
    typer.Option("--max-examples", help="test comments to score, whole threads (ignored with --full-eval)"),
]
MaxPairs = Annotated[int, typer.Option("--max-pairs", help="test pairs to score (ignored with --full-eval)")]
FullEval = Annotated[bool, typer.Option("--full-eval", help="score the whole split")]


def _train_kwargs(**kw) -> dict:
    """CLI values → RMTrainConfig fields (0 / empty mean 'unset')."""
    from karma.rm.train import DEFAULT_MAX_TRAIN

    full = kw.pop("full")
    kw["max_train"] = None if full else (kw.get("max_train") or DEFAULT_MAX_TRAIN)
    kw["eval_steps"] = kw.get("eval_steps") or None
    kw["threads"] = kw.get("threads") or None
    sub = kw.pop("train_subreddit", None)
    kw["train_subreddits"] = [sub] if sub else None
    return kw


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command("train")
def train(
    data: Data,
    out: Annotated[Path, typer.Option("--out", help="the reward-model folder to write")],
    variant: Variant = "context",
    objective: Objective = "pairwise",
    backbone: Backbone = "minilm",
    max_length: MaxLength = 128,
    epochs: Epochs = 1.0,
    max_steps: MaxSteps = -1,
    batch_size: BatchSize = 16,
    grad_accum: GradAccum = 1,
    lr: LR = 5e-5,
    max_train: MaxTrain = 1000,
    full: Full = False,
    patience: Patience = 3,
    eval_steps: EvalSteps = 0,
    margin_scale: Margin = 0.0,
    regression_weight: RegWeight = 0.5,
    regression_loss: RegLoss = "huber",
    seed: Seed = 42,
    threads: Threads = 0,
    train_subreddit: TrainSub = "",
) -> None:
    """Train a reward model. Default: a subsample (1,000 items, 128 tokens, 1 epoch) that fits minutes on a CPU."""
    from karma.models import ModelNotFoundError
    from karma.rm.data import DataError
    from karma.rm.train import train_rm

    kw = _train_kwargs(
        variant=variant,
        objective=objective,
        backbone=backbone,
        max_length=max_length,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        learning_rate=lr,
        max_train=max_train,
        full=full,
        patience=patience,
        eval_steps=eval_steps,
        margin_scale=margin_scale,
        regression_weight=regression_weight,
        regression_loss=regression_loss,
        seed=seed,
        threads=threads,
        train_subreddit=train_subreddit,
    )
    try:
        path = train_rm(data, out, **kw)
    except (DataError, ModelNotFoundError, ValueError) as e:
        _fail(e)
    cfg = json.loads((path / "karma_rm.json").read_text())
    tr, val = cfg["metrics"]["train"], cfg["metrics"]["val"]
    typer.echo(
        f"trained {variant}/{objective} on {tr['items']} of {tr['items_available']} train {tr['item_kind']}"
        + (" (SUBSAMPLED: pass --full for the full run)" if tr["subsampled"] else "")
        + f" in {cfg['metrics']['timings']['train_s']:.0f}s, {tr['steps']} steps (best step {tr['best_step']})"
    )
    acc = val.get("pairwise_accuracy")
    typer.echo(
        f"validation: spearman {val['spearman']}, pearson {val['pearson']}"
        + (f", pairwise accuracy {acc:.3f} on {val['n_pairs']} pairs" if acc is not None else "")
    )
    typer.echo(
        f"saved {path} (version {cfg['version']}); TensorBoard: tensorboard --logdir {path / 'tensorboard'}"
    )


@app.command("eval")
def eval_(
    model: Annotated[Path, typer.Option("--model", help="a reward-model folder (with karma_rm.json)")],
    data: Data,
    out: Annotated[Path, typer.Option("--out", help="folder for metrics.json, report.md and the PNG")],
    split: Annotated[str, typer.Option("--split")] = "test",
    max_examples: MaxEx = 1000,
    max_pairs: MaxPairs = 1000,
    full_eval: FullEval = False,
    no_baselines: Annotated[
        bool, typer.Option("--no-baselines", help="skip the length and bag-of-words baselines")
    ] = False,
    subreddit: Annotated[
        list[str], typer.Option("--subreddit", help="evaluate on these subreddits only")
    ] = [],  # noqa: B006
    exclude_subreddit: Annotated[list[str], typer.Option("--exclude-subreddit", help="leave these out")] = [],  # noqa: B006
    seed: Seed = 0,
) -> None:
    """Karma-prediction metrics of a reward model (and the baselines) on one split."""
    from karma.rm.data import DataError
    from karma.rm.evaluate import evaluate_rm, overall_table
    from karma.rm.model import MissingRMConfigError

    try:
        r = evaluate_rm(
            model,
            data,
            split,
            out,
            max_examples=None if full_eval else max_examples,
            max_pairs=None if full_eval else max_pairs,
            baselines=not no_baselines,
            seed=seed,
            subreddits=subreddit or None,
            exclude_subreddits=exclude_subreddit or None,
        )
    except (DataError, MissingRMConfigError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(overall_table(r["systems"]))
    if r["subsampled"]:
        typer.echo(
            f"(subsampled: {r['n_examples']} of {r['n_examples_available']} comments, {r['n_pairs']} of "
            f"{r['n_pairs_available']} pairs; --full-eval for all)"
        )
    typer.echo(f"wrote {out / 'metrics.json'}, {out / 'report.md'}, {out / 'accuracy_vs_score_ratio.png'}")


@app.command("compare")
def compare(
    data: Data,
    out: Annotated[Path, typer.Option("--out", help="folder for the models, compare.json/.md and PNGs")],
    variants: Annotated[
        str, typer.Option("--variants", help="comma-separated variants")
    ] = "full,context,response",
    objective: Objective = "pairwise",
    backbone: Backbone = "minilm",
    max_length: MaxLength = 128,
    epochs: Epochs = 1.0,
    max_steps: MaxSteps = -1,
    batch_size: BatchSize = 16,
    lr: LR = 5e-5,
    max_train: MaxTrain = 1000,
    full: Full = False,
    seed: Seed = 42,
    threads: Threads = 0,
    train_subreddit: TrainSub = "",
    split: Annotated[str, typer.Option("--split")] = "test",
    max_examples: MaxEx = 1000,
    max_pairs: MaxPairs = 1000,
    full_eval: FullEval = False,
    n_boot: Annotated[
        int, typer.Option("--bootstrap", help="bootstrap resamples for the difference intervals")
    ] = 500,
) -> None:
    """Train + evaluate several variants on the same split; one table and the answer to `full` vs `context`."""
    from karma.models import ModelNotFoundError
    from karma.rm.compare import compare_rm
    from karma.rm.data import DataError

    kw = _train_kwargs(
        objective=objective,
        backbone=backbone,
        max_length=max_length,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        learning_rate=lr,
        max_train=max_train,
        full=full,
        seed=seed,
        threads=threads,
    )
    try:
        r = compare_rm(
            data,
            out,
            [v.strip() for v in variants.split(",") if v.strip()],
            split=split,
            train_subreddit=train_subreddit or None,
            max_examples=None if full_eval else max_examples,
            max_pairs=None if full_eval else max_pairs,
            n_boot=n_boot,
            **kw,
        )
    except (DataError, ModelNotFoundError, ValueError) as e:
        _fail(e)
    from karma.rm.evaluate import overall_table

    for k, ev in r["evaluations"].items():
        typer.echo(f"\n[{k}] {ev['n_examples']} comments, {ev['n_pairs']} pairs")
        typer.echo(overall_table(ev["systems"]))
        typer.echo(ev["statement"])
    typer.echo(f"\nwrote {out / 'compare.md'} and {out / 'compare.json'}")


@app.command("rule")
def rule(
    out: Annotated[Path, typer.Option("--out", help="the rule reward-model folder to write")],
    kind: Annotated[list[str], typer.Option("--kind", help="length_window | marker (repeat to sum several)")],
    min_words: Annotated[
        int | None, typer.Option("--min-words", help="length_window: window start (words)")
    ] = None,
    max_words: Annotated[
        int | None, typer.Option("--max-words", help="length_window: window end (words)")
    ] = None,
    scale: Annotated[
        float, typer.Option("--scale", help="length_window: words outside per unit of reward lost")
    ] = 10.0,
    floor: Annotated[
        float | None, typer.Option("--floor", help="length_window: lowest value (default: none)")
    ] = None,
    marker: Annotated[
        list[str], typer.Option("--marker", help="marker: a word start to look for (repeat)")
    ] = [],  # noqa: B006
    count: Annotated[
        bool, typer.Option("--count", help="marker: count distinct markers instead of 0/1")
    ] = False,
) -> None:
    """Write a rule reward model (a positive control with a known optimum; no weights) that `karma serve` loads."""
    from karma.rm.rule import RuleSpec, RuleSpecError, write_rule_folder

    rules: list[dict] = []
    for k in kind:
        if k == "length_window":
            rules.append(
                {"kind": k, "min_words": min_words, "max_words": max_words, "scale": scale, "floor": floor}
            )
        elif k == "marker":
            rules.append({"kind": k, "count": count, **({"markers": marker} if marker else {})})
        else:
            rules.append({"kind": k})  # refused by the spec's validation, with the known kinds
    try:
        spec = RuleSpec.parse({"rules": rules}, where="karma rm rule")
    except RuleSpecError as e:
        _fail(e)
    path = write_rule_folder(spec, out)
    typer.echo(
        f"wrote {path} (rule {spec.describe()}, version {spec.version}); serve it with "
        f"`karma serve --model rule={path}`"
    )
