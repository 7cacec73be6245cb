"""`karma experiment`: the paper's design at the scale this machine allows, from one YAML config.

    prepare data ─▶ train RM variants (full, context) ─▶ evaluate karma prediction
                 ─▶ one reward service on loopback serving every variant (/models/{variant}/…)
                 ─▶ PPO a policy against each variant × exposure condition (Reddit vs non-Reddit prompts)
                 ─▶ evaluate base and every policy ─▶ paired comparison ─▶ experiment.md, claim by claim

Every stage writes into its own folder under `out` and is skipped when that folder is complete, so an
interrupted experiment resumes where it stopped (`--force` redoes everything). `karma demo` is this
pipeline with the `demo` preset (one variant, one condition).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Self

import typer

log = logging.getLogger(__name__)

PRESETS = ("quick", "cpu", "default", "demo")
DATA_SUFFIXES = (".zst", ".jsonl", ".json", ".ndjson", ".parquet")


class ExperimentError(RuntimeError):
    """A stage of the experiment failed; the message names the stage."""


# ------------------------------------------------------------------------------------------------ config
@dataclass
class ExperimentConfig:
    """One experiment: every size, seed and path. Sections map onto each stage's own config."""

    name: str = field(default="karma", metadata={"help": "label used in reports"})
    out: str = field(default="runs/experiment", metadata={"help": "output folder"})
    seed: int = field(default=0, metadata={"help": "seed of every stage"})
    data: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "karma.data.PrepareConfig fields (comments, submissions, shp, limit, ...) or {prepared: DIR}"
        },
    )
    rm: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "variants: [full, context] plus karma.rm.train.RMTrainConfig fields"},
    )
    rm_eval: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "karma.rm.evaluate.evaluate_rm options (split, max_examples, max_pairs)"},
    )
    serve: dict[str, Any] = field(default_factory=dict, metadata={"help": "extra `karma serve` options"})
    conditions: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "exposure condition -> prompt source: 'reddit' (the prepared data), 'politeness' (Stanford "
            "politeness requests minus the evaluation hold-out) or 'file:PATH'"
        },
    )
    train: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "trainer config sections (model, rollout, ppo, run, ...) shared by every PPO run"},
    )
    eval: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "karma.eval.run_eval options (suites, limit, task_limits, task_paths, n_prompts, ...)"
        },
    )
    smoke: bool = field(
        default=False,
        metadata={
            "help": "a smoke-scale run (exercises the pipeline, underpowered by design): experiment.md says so"
        },
    )

    def __post_init__(self) -> None:
        variants = self.rm.get("variants", ["full", "context"])
        from karma.rm.template import VARIANTS

        bad = [v for v in variants if v not in VARIANTS]
        if not variants or bad:
            raise ValueError(f"rm.variants must be a non-empty list of {', '.join(VARIANTS)}; got {variants}")
        if not self.conditions:
            raise ValueError(
                "conditions is empty: give at least one exposure condition (e.g. reddit: reddit)"
            )
        for cond, spec in self.conditions.items():
            if spec not in ("reddit", "politeness") and not spec.startswith("file:"):
                raise ValueError(
                    f"condition {cond!r}: prompt source must be 'reddit', 'politeness' or 'file:PATH', got {spec!r}"
                )
        if not self.data:
            raise ValueError("data is empty: give dump paths (comments/submissions/shp) or prepared: DIR")

    @property
    def variants(self) -> list[str]:
        return list(self.rm.get("variants", ["full", "context"]))

    @property
    def judge(self) -> str:
        """The RM whose score is reported for every policy's generated replies (side effects)."""
        return "context" if "context" in self.variants else self.variants[0]

    @classmethod
    def load(cls, preset_or_path: str, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
        import yaml

        if preset_or_path in PRESETS:
            text = resources.files("karma").joinpath(f"configs/experiment_{preset_or_path}.yaml").read_text()
            source = f"preset {preset_or_path}"
        else:
            path = Path(preset_or_path)
            if not path.is_file():
                raise FileNotFoundError(
                    f"experiment config not found: {path} (or use a preset: {', '.join(PRESETS)})"
                )
            text, source = path.read_text(), str(path)
        raw = yaml.safe_load(text) or {}
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ValueError(
                f"{source}: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(known))}"
            )
        for key, value in (overrides or {}).items():
            _set_dotted(raw, key, value)
        return cls(**raw)

    def to_yaml(self) -> str:
        import dataclasses

        import yaml

        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ------------------------------------------------------------------------------------------------ data
def data_spec_from_path(path: str | Path) -> dict[str, Any]:
    """`--data PATH` → the experiment's `data` section.

    PATH may be a prepared folder (has card.json), a folder of dumps (RC_* = comments, RS_* / *submissions* =
    submissions, other .jsonl/.parquet = SHP rows), or one such file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--data path does not exist: {p}")
    if p.is_dir() and (p / "card.json").exists() and (p / "examples.parquet").exists():
        return {"prepared": str(p)}
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    spec: dict[str, list[str]] = {"comments": [], "submissions": [], "shp": []}
    for f in files:
        name = f.name.lower()
        if not name.endswith(DATA_SUFFIXES):
            continue
        if name.startswith("rs_") or "submission" in name:
            spec["submissions"].append(str(f))
        elif name.startswith("rc_") or "comment" in name or name.endswith(".zst"):
            spec["comments"].append(str(f))
        else:
            spec["shp"].append(str(f))
    spec = {k: v for k, v in spec.items() if v}
    if not spec:
        raise FileNotFoundError(
            f"no Pushshift dumps (RC_*/RS_* .zst/.jsonl) or SHP rows (.jsonl/.parquet) found in {p}"
        )
    return spec


# ------------------------------------------------------------------------------------------------ service
@contextmanager
def reward_service(
    models: dict[str, Path],
    *,
    default: str,
    log_file: Path,
    options: dict[str, Any] | None = None,
    ready_timeout_s: float = 300.0,
) -> Iterator[str]:
    """Start `karma serve` as its own process on a free loopback port; yield its base URL; stop it."""
    from karma.net import free_port, wait_http_ok

    port = int((options or {}).get("port") or free_port())
    cmd = [
        sys.executable,
        "-m",
        "karma.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--default",
        default,
    ]
    for name, path in models.items():
        cmd += ["--model", f"{name}={path}"]
    for key, value in (options or {}).items():
        if key != "port":
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    url = f"http://127.0.0.1:{port}"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def still_running() -> None:
        if proc.poll() is not None:
            raise ExperimentError(
                f"reward service exited with code {proc.returncode} during start-up; see {log_file}"
            )

    try:
        try:
            wait_http_ok(f"{url}/ready", ready_timeout_s, interval_s=0.5, check=still_running)
        except TimeoutError:
            raise ExperimentError(
                f"reward service at {url} not ready after {ready_timeout_s:.0f}s; see {log_file}"
            ) from None
        log.info("reward service ready at %s (models: %s)", url, ", ".join(models))
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


# ------------------------------------------------------------------------------------------------ stages
@dataclass
class Stage:
    """A named, timed step; `done` makes re-runs skip it."""

    name: str
    timings: dict[str, float]

    def __enter__(self) -> Self:
        log.info("── %s", self.name)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = round(time.perf_counter() - self._t0, 1)


def run_experiment(cfg: ExperimentConfig, *, force: bool = False) -> Path:
    """Run every stage; return the path of experiment.md."""
    out = Path(cfg.out)
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.yaml").write_text(cfg.to_yaml())
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    # a resumed run keeps the times of the stages an earlier run finished (they are skipped now)
    previous = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}

    with Stage("prepare data", timings):
        data_dir = _prepare(cfg, out)
    rm_dirs, rm_metrics = {}, {}
    for variant in cfg.variants:
        with Stage(f"train RM ({variant})", timings):
            rm_dirs[variant] = _train_rm(cfg, data_dir, out / "rm" / variant, variant)
    with Stage("evaluate RMs", timings):  # every variant on the same rows: their differences are paired
        joint = _eval_rm(cfg, data_dir, list(rm_dirs.values()), out / "rm" / "eval")
        rm_metrics = {variant: joint for variant in cfg.variants}

    policies: dict[str, Path] = {}
    with reward_service(
        rm_dirs, default=cfg.judge, log_file=out / "logs" / "reward_service.log", options=cfg.serve
    ) as url:
        for variant in cfg.variants:
            for cond, spec in cfg.conditions.items():
                run = f"{variant}-{cond}"
                with Stage(f"PPO {run}", timings):
                    policies[run] = _train_policy(
                        cfg, data_dir, spec, f"{url}/models/{variant}", out / "policies" / run
                    )
        eval_dir = out / "eval"
        judge_url = f"{url}/models/{cfg.judge}"
        base_model = cfg.train.get("model", {}).get("policy", "smollm2")
        with Stage("evaluate base", timings):
            _eval_policy(cfg, base_model, eval_dir / "base", judge_url, data_dir)
        for run, path in policies.items():
            with Stage(f"evaluate {run}", timings):
                _eval_policy(cfg, str(path), eval_dir / run, judge_url, data_dir)

    from karma.eval import compare

    with Stage("compare", timings):
        comparison = compare(
            eval_dir / "base",
            *(eval_dir / r for r in policies),
            out=out / "compare",
            names=list(policies),
            seed=cfg.seed,
        )
        head_to_head = {}  # claim 3: the `context` policy against the `full` one, paired on the same items
        for cond in cfg.conditions:
            full_run, context_run = f"full-{cond}", f"context-{cond}"
            if full_run in policies and context_run in policies:
                head_to_head[cond] = compare(
                    eval_dir / full_run,
                    eval_dir / context_run,
                    names=[context_run],
                    out=out / "compare" / f"{context_run}_vs_{full_run}",
                    seed=cfg.seed,
                    plots=False,
                )
    training = {run: _training_summary(path) for run, path in policies.items()}
    for stage, seconds in previous.items():
        if stage != "total" and timings.get(stage, 0.0) < 1.0 and seconds >= 1.0:
            timings[stage] = seconds
    timings["total"] = round(time.perf_counter() - t_start, 1)
    if previous:
        timings["total (this run, resumed)"] = timings.pop("total")
        if "total" in previous:  # the run that did the work
            timings = {"total": previous["total"], **timings}
    report = write_report(cfg, out, rm_metrics, comparison, training, timings, head_to_head)
    log.info("experiment report: %s", report)
    return report


def _prepare(cfg: ExperimentConfig, out: Path) -> Path:
    if "prepared" in cfg.data:
        d = Path(cfg.data["prepared"])
        if not (d / "examples.parquet").exists():
            raise ExperimentError(
                f"data.prepared {d} has no examples.parquet (run `karma data prepare` first)"
            )
        return d
    d = out / "data"
    if (d / "card.json").exists():
        log.info("prepared data found in %s (skipping)", d)
        return d
    from karma.data import prepare

    card = prepare(out=str(d), seed=cfg.seed, **cfg.data)
    splits = card.get("splits", {})
    log.info(
        "prepared %s",
        ", ".join(
            f"{name}: {v.get('examples')} examples / {v.get('pairs')} pairs"
            for name, v in splits.items()
            if isinstance(v, dict)
        ),
    )
    return d


def _train_rm(cfg: ExperimentConfig, data_dir: Path, dest: Path, variant: str) -> Path:
    if (dest / "karma_rm.json").exists():
        log.info("reward model found in %s (skipping)", dest)
        return dest
    from karma.rm.train import train_rm

    options = {k: v for k, v in cfg.rm.items() if k != "variants"}
    options.setdefault("seed", cfg.seed)
    return train_rm(data_dir, dest, variant=variant, **options)


def _eval_rm(cfg: ExperimentConfig, data_dir: Path, model: Path | list[Path], dest: Path) -> dict[str, Any]:
    if (dest / "metrics.json").exists():
        return json.loads((dest / "metrics.json").read_text())
    from karma.rm.evaluate import evaluate_rm

    options = {"split": "test", **cfg.rm_eval}
    return evaluate_rm(model, data_dir, out=dest, seed=cfg.seed, **options)


def _train_policy(cfg: ExperimentConfig, data_dir: Path, spec: str, reward_url: str, dest: Path) -> Path:
    if (dest / "config.json").exists() and (dest / "metrics.jsonl").exists():
        log.info("policy found in %s (skipping)", dest)
        return dest
    from services.policy_trainer import train

    if spec == "reddit":
        prompts = f"reddit:{data_dir}"
    elif spec == "politeness":
        prompts = f"file:{politeness_train_prompts(dest.parent / 'politeness_train.jsonl')}"
    else:
        prompts = spec
    run_cfg = _deep_merge(
        cfg.train,
        {
            "data": {"prompts": prompts},
            "reward": {"reward_url": [reward_url]},
            "run": {"output_dir": str(dest), "seed": cfg.seed},
        },
    )
    return Path(train(run_cfg))


def politeness_train_prompts(dest: Path) -> Path:
    """The non-Reddit training prompts: politeness-corpus requests, minus the rows `karma eval` holds out."""
    import csv

    from karma.eval.prompts import POLITENESS_FILES, is_heldout
    from karma.paths import shared_data_dir

    rows = []
    for name in POLITENESS_FILES:
        path = shared_data_dir() / "eval" / "politeness" / name
        if not path.exists():
            raise FileNotFoundError(f"politeness corpus file not found: {path} (set KARMA_SHARED_DATA)")
        with path.open(newline="", encoding="utf-8") as f:
            rows += [
                {"prompt": r["Request"].strip()}
                for r in csv.DictReader(f)
                if r["Request"].strip() and not is_heldout(r["Community"], r["Id"])
            ]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest


def _eval_policy(
    cfg: ExperimentConfig, model: str, dest: Path, reward_url: str, data_dir: Path
) -> dict[str, Any]:
    if (dest / "results.json").exists():
        return json.loads((dest / "results.json").read_text())
    from karma.eval import run_eval

    options = dict(cfg.eval)
    options.setdefault("seed", cfg.seed)
    return run_eval(model, out=dest, reward_url=reward_url, **options)


HELDOUT_FILE = (
    "heldout_reward.json"  # written by the trainer at the end of a completed run (services.policy_trainer)
)


def _training_summary(policy_dir: Path) -> dict[str, Any]:
    """First/last logged reward and KL of a PPO run (the trainer's metrics.jsonl), and its held-out reward of
    base vs trained policy (`heldout_reward.json`, under `heldout`) when the run wrote one (older runs did not)."""
    out: dict[str, Any] = {}
    metrics_file = policy_dir / "metrics.jsonl"
    rows = (
        [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        if metrics_file.exists()
        else []
    )
    keys_r, keys_kl = ("reward/mean", "reward_mean"), ("objective/kl", "kl", "kl/mean")
    rows = [r for r in rows if any(k in r for k in keys_r)]  # training steps, not other logged records

    def pick(row: dict[str, Any], *names: str) -> float | None:
        for n in names:
            if n in row:
                return row[n]
        return None

    if rows:
        out = {
            "steps": len(rows),
            "reward_first": pick(rows[0], *keys_r),
            "reward_last": pick(rows[-1], *keys_r),
            "kl_last": pick(rows[-1], *keys_kl),
        }
    heldout_file = policy_dir / HELDOUT_FILE
    if heldout_file.exists():
        try:
            heldout = json.loads(heldout_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            heldout = {"error": f"unreadable {HELDOUT_FILE}: {e}"}
        out["heldout"] = (
            heldout if isinstance(heldout, dict) else {"error": f"{HELDOUT_FILE} is not an object"}
        )
    return out


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _ppo_row(run: str, t: dict[str, Any]) -> str:
    """One row of the PPO table: training log, then the held-out reward (base → trained) when recorded."""
    cells = [
        run,
        str(t.get("steps", "—")),
        _fmt(t.get("reward_first")),
        _fmt(t.get("reward_last")),
        _fmt(t.get("kl_last"), 4),
    ]
    h = t.get("heldout")
    if not h:
        cells += ["not recorded (older run)", "—", "—", "—", "—", "—"]
    elif "error" in h:
        cells += [h["error"], "—", "—", "—", "—", "—"]
    else:
        from karma.eval.comparison import fmt_mde

        def pair(a: str, b: str, digits: int = 3) -> str:
            x, y = _num(h.get(a)), _num(h.get(b))
            return "—" if x is None or y is None else f"{x:.{digits}f} → {y:.{digits}f}"

        d, lo, hi, p = (_num(h.get(k)) for k in ("delta", "ci_low", "ci_high", "p"))
        delta = "—"
        if d is not None:
            ci = f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else ""
            delta = f"{d:+.3f}{ci}{'*' if p is not None and p < ALPHA else ''}"
        n = h.get("n")
        cells += [
            pair("base_mean", "trained_mean") + (f" (n = {n})" if n else ""),
            delta,
            "—" if p is None else f"{p:.3g}",
            fmt_mde(_num(h.get("mde"))),
            _fmt(_num(h.get("kl_mean")), 3),
            f"{pair('base_mean_words', 'trained_mean_words', 1)} / {pair('base_eos_rate', 'trained_eos_rate', 2)}",
        ]
    return "| " + " | ".join(cells) + " |"


# ------------------------------------------------------------------------------------------------ report
def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:+.{digits}f}" if isinstance(x, float) and digits < 0 else f"{x:.{abs(digits)}f}"


def _rows(
    comparison: dict[str, Any],
    *,
    suite: str | None = None,
    kind: str | None = None,
    row: str | None = None,
    metric: str,
) -> list[dict[str, Any]]:
    return [
        r
        for r in comparison["rows"]
        if r["metric"] == metric
        and (suite is None or r["suite"] == suite)
        and (kind is None or r["kind"] == kind)
        and (row is None or r["row"] == row)
    ]


NO_CHANGE = 1e-6  # |Δ| below this counts as "no change", not as a rise or a fall
ALPHA = 0.05  # a run supports a claim when its Δ points the claimed way *and* its paired test has p < ALPHA
POWER = 0.80  # the power at which `karma eval compare` states every minimum detectable effect (power.POWER)
# The largest effect we consider plausible for PPO at these scales on accuracy-like metrics (accuracy, MC1,
# MC2 probability mass): 5 points. A run whose MDE exceeds it could only have detected implausibly large
# effects, so its "not reproduced" is "underpowered". The cpu preset is sized to an MDE below it.
PLAUSIBLE_EFFECT = 0.05


def _verdict(flags: list[tuple[bool, bool]], what: str, cells: list[dict[str, Any]] | None = None) -> str:
    """`flags`: per run, (Δ points the claimed way, and that is significant at p < ALPHA); `cells`: the
    compared rows behind them, whose `mde` and `n` say what the runs could have detected."""
    n = len(flags)
    significant = sum(d and s for d, s in flags)
    direction = sum(d for d, _ in flags)
    if n and significant == n:
        return f"**Reproduced** ({what}, p < {ALPHA:g}, in all {n} runs){_power_suffix(cells, found=True)}"
    if significant:
        return (
            f"**Partly reproduced** ({what}, p < {ALPHA:g}, in {significant} of {n} runs)"
            f"{_power_suffix(cells, found=True)}"
        )
    if direction:
        return (
            f"**Not reproduced at this scale** ({what} in {direction} of {n} runs, "
            f"none significant at p < {ALPHA:g}){_power_suffix(cells, found=False)}"
        )
    return f"**Not reproduced at this scale**{_power_suffix(cells, found=False)}"


def _span(values: list[float], fmt: str = "{:.3f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}"


def _power_suffix(cells: list[dict[str, Any]] | None, *, found: bool) -> str:
    """What the runs could have detected: ': no effect larger than 0.041 (MDE at 80 % power, n = 1,303)',
    or ': underpowered: MDE 0.31 exceeds any plausible effect (5 points) at n = 15'."""
    if cells is None:
        return ""
    ns = [int(c["n"]) for c in cells if c.get("n")]
    mdes = [float(c["mde"]) for c in cells if c.get("mde") is not None and not math.isnan(float(c["mde"]))]
    n_txt = f"n = {_span(ns, '{:,}')}" if ns else "n unknown"
    if not mdes:
        return f" (MDE not recorded, {n_txt})"
    worst = max(mdes)
    if found:
        return f" (MDE {_span(mdes)} at {POWER * 100:g} % power, {n_txt})"
    if math.isinf(worst):
        from karma.eval.power import mcnemar_min_discordant

        return (
            f": underpowered: at {n_txt} no result could reach p < {ALPHA:g} "
            f"(exact McNemar and sign-flip tests need at least {mcnemar_min_discordant(ALPHA)} changed items)"
        )
    if worst > PLAUSIBLE_EFFECT:
        return (
            f": underpowered: MDE {_span(mdes)} exceeds any plausible effect ({PLAUSIBLE_EFFECT * 100:g} points) "
            f"at {n_txt}"
        )
    return f": no effect larger than {worst:.3f} (MDE at {POWER * 100:g} % power, {n_txt})"


def _supports(c: dict[str, Any], sign: int) -> tuple[bool, bool]:
    direction = c["delta"] * sign > NO_CHANGE
    return direction, direction and c.get("p", 1.0) < ALPHA


def _mde_text(c: dict[str, Any]) -> str:
    from karma.eval.comparison import fmt_mde

    if "mde" not in c:
        return ""
    basis = c.get("discordance")
    disc = f", discordance {basis:.3f}" if isinstance(basis, float) and not math.isnan(basis) else ""
    return f", MDE {fmt_mde(c['mde'])}{disc}"


def _delta_cell(c: dict[str, Any]) -> str:
    star = "*" if c.get("p", 1) < 0.05 else ""
    return (
        f"{c['delta']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]{star} "
        f"(p={c['p']:.3g}, n={c['n']}{_mde_text(c)})"
    )


def _side_cell(run: str, c: dict[str, Any]) -> str:
    from karma.eval.comparison import fmt_mde

    star = "*" if c["p"] < 0.05 else ""
    mde = f" (MDE {fmt_mde(c['mde'])})" if "mde" in c else ""
    return f"`{run}` {c['delta']:+.3f}{star}{mde}"


def _claim_one_unpaired(cfg: ExperimentConfig, rm_metrics: dict[str, Any], overall, metric) -> list[str]:
    """Claim 1 from point estimates only: for RM evaluations written before paired pair sets existed."""
    lines: list[str] = []
    table = ["| system | Spearman | Pearson | pairwise acc | NDCG@5 |", "|---|---|---|---|---|"]
    rows = [(f"RM `{v}`", overall(v)) for v in cfg.variants]
    first = cfg.variants[0]
    rows += [(f"baseline: {b}", overall(first, b)) for b in ("length", "bow_ridge")]
    for label, o in rows:
        table.append(
            f"| {label} | {_fmt(o.get('spearman'))} | {_fmt(o.get('pearson'))} | "
            f"{_fmt(o.get('pairwise_accuracy'))} | {_fmt(o.get('ndcg@5'))} |"
        )
    n = rm_metrics[first]
    n_ex = n.get("n_examples")
    se = f" (a Spearman's standard error at this n is about 1/√n = {n_ex**-0.5:.3f})" if n_ex else ""
    lines += table + ["", f"Test split: {n_ex} replies, {n.get('n_pairs')} pairs{se}.", ""]
    if {"full", "context"} <= set(cfg.variants):
        sf, sc = metric("full", "spearman"), metric("context", "spearman")
        if sf is not None and sc is not None:
            better = sf > sc
            lines.append(
                (
                    "**Reproduced**: `full` predicts karma better than `context`"
                    if better
                    else "**Not reproduced at this scale**: `full` does not predict karma better than `context`"
                )
                + f" (Spearman {sf:.3f} vs {sc:.3f})."
            )
    else:
        lines.append("Not tested: the experiment trained only " + ", ".join(cfg.variants) + ".")
    lines.append("")
    return lines


def claims(
    cfg: ExperimentConfig,
    rm_metrics: dict[str, Any],
    comparison: dict[str, Any],
    head_to_head: dict[str, dict[str, Any]] | None = None,
) -> list[str]:
    """The paper's claims, each stated from the numbers ("not reproduced" where that is what happened).

    `comparison`: every trained policy against the base (`karma eval compare`). `head_to_head`: per exposure
    condition, the `context` policy compared against the `full` one (the `full` policy as the "base"), for
    claim 3. A claim counts as reproduced in a run only where the paired test is significant at p < ALPHA.
    """
    lines: list[str] = []
    runs = [t["label"] for t in comparison["trained"]]

    # 1. Karma prediction: full vs context
    lines.append("### 1. The best karma predictor: `full` (context + metadata) vs `context` (text only)")

    def overall(v: str, system: str | None = None) -> dict[str, Any]:
        systems = rm_metrics[v].get("systems", {})
        return (systems.get(system or f"rm:{v}") or {}).get("overall", {})

    def metric(v: str, key: str) -> float | None:
        return overall(v).get(key)

    first = cfg.variants[0]
    if (rm_metrics[first].get("pair_sets") or {}).get("sets"):
        from karma.rm.compare import karma_prediction_claim

        lines += karma_prediction_claim(rm_metrics[first]) + [""]
        if not {"full", "context"} <= set(cfg.variants):
            lines += ["Not tested: the experiment trained only " + ", ".join(cfg.variants) + ".", ""]
    else:  # an evaluation written before pair sets existed
        lines += _claim_one_unpaired(cfg, rm_metrics, overall, metric)

    # 2. Pragmatics up
    lines.append("### 2. Pragmatics improve after KARMA training")
    prag = _rows(comparison, suite="pragmatics", kind="suite", metric="acc")
    flags, cells = [], []
    for r in prag:
        for run in runs:
            if run in r["models"]:
                c = r["models"][run]
                flags.append(_supports(c, +1))
                cells.append(c)
                lines.append(f"- `{run}`: Δ pragmatics accuracy (mean over tasks) {_delta_cell(c)}")
    lines.append(
        _verdict(flags, "pragmatics accuracy went up", cells) if prag else "No pragmatics suite row to test."
    )
    lines.append("")

    # 3. Context RM trains better policies
    lines.append("### 3. The text-only `context` RM trains better policies than the `full` RM")
    if {"full", "context"} <= set(cfg.variants):
        flags, cells = [], []
        for cond in cfg.conditions:
            h2h = (head_to_head or {}).get(cond)
            rows = _rows(h2h, suite="pragmatics", kind="suite", metric="acc") if h2h else []
            c = rows[0]["models"].get(f"context-{cond}") if rows else None
            if c is None:
                lines.append(
                    f"- {cond} prompts: no head-to-head comparison of `context-{cond}` with `full-{cond}`"
                )
                continue
            flags.append(_supports(c, +1))
            cells.append(c)
            lines.append(
                f"- {cond} prompts: pragmatics accuracy, `context-{cond}` − `full-{cond}`: {_delta_cell(c)}"
            )
        lines.append(
            _verdict(flags, "`context` beat `full`", cells) if flags else "Not tested (no head-to-head rows)."
        )
    else:
        lines.append("Not tested (needs both `full` and `context` variants).")
    lines.append("")

    # 4. Side effects
    lines.append(f"### 4. Side effects (hhh_alignment; generated replies scored by the `{cfg.judge}` RM)")
    side = [
        r
        for r in comparison["rows"]
        if r["suite"] == "side_effects" and r["kind"] in ("task", "family", "suite")
    ]
    seen = set()
    for r in side:
        key = (r["row"], r["metric"])
        if key in seen or (r["kind"] == "task" and "/" in r["row"]):
            continue
        seen.add(key)
        present = [run for run in runs if run in r["models"]]
        text = ", ".join(_side_cell(run, r["models"][run]) for run in present)
        ns = sorted({r["models"][run]["n"] for run in present})
        lines.append(f"- {r['row']} / {r['metric']} (n = {_span(ns, '{:,}')}): {text}")
    lines.append(
        f"(Δ vs base; `*` p < 0.05; MDE: the smallest |Δ| detectable at {POWER * 100:g} % power, on "
        "the metric's own scale. Reward hacking would show as reward up while hhh, distinct-n fall.)"
    )
    lines.append("")

    # 5. Factuality down in every condition
    lines.append("### 5. Factuality drops in every condition")
    flags, cells = [], []
    for metric_name in ("mc1", "mc2"):
        for r in _rows(comparison, suite="factuality", kind="task", metric=metric_name):
            for run in runs:
                if run in r["models"]:
                    c = r["models"][run]
                    flags.append(_supports(c, -1))
                    cells.append(c)
                    lines.append(f"- `{run}` {r['row']} {metric_name}: {_delta_cell(c)}")
    lines.append(_verdict(flags, "TruthfulQA went down", cells) if flags else "No TruthfulQA rows to test.")
    lines.append("")
    return lines


def _smoke_banner(cfg: ExperimentConfig) -> list[str]:
    return [
        (
            f"**Smoke run** (`{cfg.name}`): sizes far below the paper's, to exercise every stage of the design "
            "quickly. It is underpowered by design — the MDEs beside the verdicts say how large an effect it "
            'could have detected — so its "not reproduced" verdicts are not evidence against the claims. '
            "The `cpu` preset is sized for power on this hardware; the default preset is the GPU run."
        ),
        "",
    ]


def write_report(
    cfg: ExperimentConfig,
    out: Path,
    rm_metrics: dict[str, Any],
    comparison: dict[str, Any],
    training: dict[str, Any],
    timings: dict[str, float],
    head_to_head: dict[str, dict[str, Any]] | None = None,
) -> Path:
    lines = [
        f"# KARMA experiment `{cfg.name}`",
        "",
        f"RM variants: {', '.join(cfg.variants)}; exposure conditions: "
        + ", ".join(f"{k} (`{v}`)" for k, v in cfg.conditions.items())
        + f"; seed {cfg.seed}. Config: `experiment.yaml`. Every number below was computed by this run.",
        "",
        *(_smoke_banner(cfg) if cfg.smoke else []),
        "## Claims",
        "",
        (
            f"A run supports a claim only where its Δ points the claimed way *and* the paired test has p < {ALPHA:g} "
            "(exact McNemar for 0/1 scores, paired permutation otherwise; items paired by id). "
            "95 % CIs are paired bootstrap. Beside each verdict: n and the minimum detectable effect (MDE) — the "
            f"smallest true |Δ| its test would have found with {POWER * 100:g} % power (two-sided α = {ALPHA:g}); "
            "exact McNemar at the observed discordance for 0/1 scores, paired t for continuous ones, a normal "
            "approximation for a mean of task means. Not reproduced means no effect larger than the MDE, not no "
            f"effect; a run whose MDE exceeds {PLAUSIBLE_EFFECT * 100:g} points is underpowered for the claim."
        ),
        "",
        *claims(cfg, rm_metrics, comparison, head_to_head),
        "## PPO runs (reward from each run's own RM, over HTTP)",
        "",
        (
            "Training log (first / last step), then the held-out reward each run measured at its end "
            f"(`{HELDOUT_FILE}`): base → trained policy on the same held-out prompts, Δ with its 95 % CI "
            f"(`*` p < {ALPHA:g}), p, the MDE at {POWER * 100:g} % power, the sequence KL(trained ‖ base), and reply "
            "length in words / EOS rate, base → trained."
        ),
        "",
        (
            "| run | steps | reward first | reward last | KL last | held-out reward base → trained | Δ [95% CI] | p | "
            "MDE | KL | words / EOS rate |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_ppo_row(run, t) for run, t in training.items()]
    sources = sorted(
        {
            str(t["heldout"].get("source"))
            for t in training.values()
            if t.get("heldout") and "error" not in t["heldout"]
        }
    )
    if sources:
        lines += ["", f"Held-out prompts: {', '.join(sources)}."]
    lines += [
        "",
        "## Full comparison table",
        "",
        ("See `compare/compare.md` and `compare/compare.png`; reward-model reports in `rm/<variant>/eval/`."),
        "",
        "## Time per stage (s)",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in timings.items()]
    path = out / "experiment.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    return path


# ------------------------------------------------------------------------------------------------ CLI
def experiment(
    config: Annotated[
        str, typer.Option("--config", "-c", help="a YAML file, or a preset: quick | cpu | default | demo")
    ] = "default",
    quick: Annotated[
        bool, typer.Option("--quick", help="the `quick` preset (~30 min on a 2-core CPU)")
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="dumps folder/file or a prepared folder (overrides the config)"),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="output folder (overrides the config)")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    force: Annotated[bool, typer.Option("--force", help="redo every stage instead of resuming")] = False,
) -> None:
    """Run the paper's experiment: RM variants × exposure conditions → PPO → evaluation → experiment.md."""
    overrides: dict[str, Any] = {}
    if out is not None:
        overrides["out"] = str(out)
    if seed is not None:
        overrides["seed"] = seed
    try:
        cfg = ExperimentConfig.load("quick" if quick else config, overrides)
        if data is not None:
            cfg.data = {
                **{
                    k: v
                    for k, v in cfg.data.items()
                    if k not in ("comments", "submissions", "shp", "prepared")
                },
                **data_spec_from_path(data),
            }
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = run_experiment(cfg, force=force)
    typer.echo(f"experiment report: {report}")
