"""`karma rm train | eval | compare | rule` — the reward-model stage's commands (heavy imports inside each
command). The flags of train / eval / compare are generated from their config types below (`karma.config`);
each is also `KARMA_RM_<COMMAND>_<FIELD>` and a key of `--config FILE`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel, ConfigDict, Field, field_validator

from karma.config import Cli, command
from karma.rm.evaluate import RMEvalConfig
from karma.rm.template import VARIANTS
from karma.rm.train import RMHyperParams, RMTrainConfig

app = typer.Typer(no_args_is_help=True)

ENV_PREFIX = "KARMA_RM_"


class _Job(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RMTrainJob(_Job):
    """`karma rm train`: one reward model from a prepared data folder."""

    data: Path = Field(description="a `karma data prepare` output folder")
    out: Path = Field(description="the reward-model folder to write")
    full: bool = Field(False, description="use every training item (hours on a CPU) instead of max_train")
    training: RMTrainConfig = Field(default_factory=RMTrainConfig)


class RMEvalJob(_Job):
    """`karma rm eval`: karma-prediction metrics of a reward model (and the baselines) on one split."""

    model: Path = Field(description="a reward-model folder (with karma_rm.json)")
    data: Path = Field(description="a `karma data prepare` output folder")
    out: Path = Field(description="folder for metrics.json, report.md and the PNG")
    seed: int = Field(0, description="seed of the row subsample and the bootstrap")
    evaluation: RMEvalConfig = Field(default_factory=RMEvalConfig)


class RMCompareJob(_Job):
    """`karma rm compare`: several variants trained alike and evaluated on the same rows."""

    data: Path = Field(description="a `karma data prepare` output folder")
    out: Path = Field(description="folder for the models, compare.json/.md and PNGs")
    variants: Annotated[list[Literal[VARIANTS]], Cli("--variants")] = Field(
        default_factory=lambda: list(VARIANTS), description="variants to train; repeatable or comma-separated"
    )
    full: bool = Field(False, description="use every training item (hours on a CPU) instead of max_train")
    n_boot: Annotated[int, Cli("--bootstrap")] = Field(
        500, ge=1, description="bootstrap resamples for the difference intervals"
    )
    training: RMHyperParams = Field(default_factory=RMHyperParams)
    evaluation: RMEvalConfig = Field(default_factory=RMEvalConfig)

    @field_validator("variants", mode="before")
    @classmethod
    def _commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        return [v.strip() for item in value for v in str(item).split(",") if v.strip()]


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _training(job: RMTrainJob | RMCompareJob) -> dict[str, Any]:
    kw = job.training.model_dump()
    if job.full:
        kw["max_train"] = None
    return kw


def run_train(job: RMTrainJob) -> None:
    """Train a reward model. Default: a subsample (1,000 items, 128 tokens, 1 epoch) that fits minutes on a CPU."""
    from karma.models import ModelNotFoundError
    from karma.rm.data import DataError
    from karma.rm.train import train_rm

    try:
        path = train_rm(job.data, job.out, **_training(job))
    except (DataError, ModelNotFoundError, ValueError) as e:
        _fail(e)
    cfg = json.loads((path / "karma_rm.json").read_text())
    tr, val = cfg["metrics"]["train"], cfg["metrics"]["val"]
    variant, objective = job.training.variant, job.training.objective
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


def run_eval(job: RMEvalJob) -> None:
    """Karma-prediction metrics of a reward model (and the baselines) on one split."""
    from karma.rm.data import DataError
    from karma.rm.evaluate import evaluate_rm, overall_table
    from karma.rm.model import MissingRMConfigError

    ev, out = job.evaluation, job.out
    try:
        r = evaluate_rm(
            job.model,
            job.data,
            ev.split,
            out,
            **ev.limits(),
            baselines=ev.baselines,
            seed=job.seed,
            subreddits=ev.subreddits or None,
            exclude_subreddits=ev.exclude_subreddits or None,
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


def run_compare(job: RMCompareJob) -> None:
    """Train + evaluate several variants on the same split; one table and the answer to `full` vs `context`."""
    from karma.models import ModelNotFoundError
    from karma.rm.compare import compare_rm
    from karma.rm.data import DataError
    from karma.rm.evaluate import overall_table

    kw = _training(job)
    subs = kw.pop("train_subreddits") or []
    if len(subs) > 1:
        _fail(ValueError("compare trains on at most one --train-subreddit (in-domain vs transfer)"))
    ev, out = job.evaluation, job.out
    try:
        r = compare_rm(
            job.data,
            out,
            job.variants,
            split=ev.split,
            train_subreddit=subs[0] if subs else None,
            **ev.limits(),
            n_boot=job.n_boot,
            **kw,
        )
    except (DataError, ModelNotFoundError, ValueError) as e:
        _fail(e)
    for k, result in r["evaluations"].items():
        typer.echo(f"\n[{k}] {result['n_examples']} comments, {result['n_pairs']} pairs")
        typer.echo(overall_table(result["systems"]))
        typer.echo(result["statement"])
    typer.echo(f"\nwrote {out / 'compare.md'} and {out / 'compare.json'}")


app.command("train")(command(RMTrainJob, run_train, prefix=ENV_PREFIX + "TRAIN_", help=run_train.__doc__))
app.command("eval")(command(RMEvalJob, run_eval, prefix=ENV_PREFIX + "EVAL_", help=run_eval.__doc__))
app.command("compare")(
    command(RMCompareJob, run_compare, prefix=ENV_PREFIX + "COMPARE_", help=run_compare.__doc__)
)


@app.command("rule")
def rule(
    out: Annotated[Path, typer.Option("--out", help="the rule reward-model folder to write")],
    kind: Annotated[
        list[str],
        typer.Option(
            "--kind", help="length_window | marker | distinct_n | refusal | format (repeat to sum several)"
        ),
    ],
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
    n: Annotated[int, typer.Option("--n", help="distinct_n: n-gram size in words")] = 2,
    phrase: Annotated[
        list[str],
        typer.Option("--phrase", help="refusal: a refusal phrase (repeat; default: a built-in list)"),
    ] = [],  # noqa: B006
    pattern: Annotated[
        str | None, typer.Option("--pattern", help="format: a Python regular expression")
    ] = None,
    full_match: Annotated[
        bool, typer.Option("--full-match", help="format: the whole reply must match")
    ] = False,
) -> None:
    """Write a rule reward model (a positive control with a known optimum; no weights) that `karma serve` loads."""
    from karma.rm.rule import RuleSpec, RuleSpecError, write_rule_folder

    options: dict[str, dict] = {
        "length_window": {"min_words": min_words, "max_words": max_words, "scale": scale, "floor": floor},
        "marker": {"count": count, **({"markers": marker} if marker else {})},
        "distinct_n": {"n": n},
        "refusal": {"phrases": phrase} if phrase else {},
        "format": {"pattern": pattern, "full": full_match},
    }
    # an unknown kind is refused by the spec's validation, which names the known kinds
    rules = [{"kind": k, **options.get(k, {})} for k in kind]
    try:
        spec = RuleSpec.parse({"rules": rules}, where="karma rm rule")
    except RuleSpecError as e:
        _fail(e)
    path = write_rule_folder(spec, out)
    typer.echo(
        f"wrote {path} (rule {spec.describe()}, version {spec.version}); serve it with "
        f"`karma serve --model rule={path}`"
    )


@app.command("compose")
def compose(
    spec: Annotated[
        Path, typer.Option("--spec", help="a composition: YAML/JSON with `components` (see docs)")
    ],
    out: Annotated[Path, typer.Option("--out", help="the composition folder to write")],
) -> None:
    """Write a composed reward (weighted served models + rules) that `karma serve` loads beside its components."""
    from karma.rm.compose import CompositionSpec, CompositionSpecError, write_compose_folder

    if not spec.is_file():
        _fail(FileNotFoundError(f"composition file not found: {spec}"))
    try:
        parsed = CompositionSpec.parse(spec.read_text(), where=str(spec))
    except CompositionSpecError as e:
        _fail(e)
    path = write_compose_folder(parsed, out)
    models = " ".join(f"--model {m}=PATH" for m in parsed.models)
    typer.echo(
        f"wrote {path} ({parsed.describe()}, definition {parsed.version}); serve it with its components: "
        f"`karma serve {models} --model NAME={path}`"
    )
