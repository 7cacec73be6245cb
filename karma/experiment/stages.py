"""The experiment's stages: prepare data, train and evaluate the RM variants, serve them, PPO each variant x
condition, evaluate every policy, compare. Each stage writes into its own folder under `out` and is skipped
when that folder is complete, so an interrupted experiment resumes where it stopped."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from karma.experiment.config import ExperimentConfig, PreparedData
from karma.experiment.isolate import run_isolated, stage_env
from karma.experiment.report import training_summary, write_report
from karma.rm.compose import write_compose_folder

log = logging.getLogger(__name__)


class ExperimentError(RuntimeError):
    """A stage of the experiment failed; the message names the stage."""


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class ServiceHandle:
    """A `karma serve` process being started: `ready()` waits for it (once) and returns its base URL."""

    url: str
    _wait: Any
    _ready: bool = False

    def ready(self) -> str:
        if not self._ready:
            self._wait()
            self._ready = True
        return self.url


@contextmanager
def reward_service(
    models: dict[str, Path],
    *,
    default: str,
    log_file: Path,
    flags: list[str] | None = None,
    port: int | None = None,
    ready_timeout_s: float = 300.0,
) -> Iterator[ServiceHandle]:
    """Start `karma serve` as its own process on a free loopback port (or `port`) with extra `flags`; yield
    a handle whose `ready()` waits for it (so the caller can do other work while it loads); stop it."""
    from karma.net import free_port, stop_process, wait_http_ok

    port = int(port or free_port())
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
    cmd += flags or []
    url = f"http://127.0.0.1:{port}"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=stage_env()
        )

    def still_running() -> None:
        if proc.poll() is not None:
            raise ExperimentError(
                f"reward service exited with code {proc.returncode} during start-up; see {log_file}"
            )

    def wait() -> None:
        try:
            wait_http_ok(f"{url}/ready", ready_timeout_s, interval_s=0.5, check=still_running)
        except TimeoutError:
            raise ExperimentError(
                f"reward service at {url} not ready after {ready_timeout_s:.0f}s; see {log_file}"
            ) from None
        log.info("reward service ready at %s (models: %s)", url, ", ".join(models))

    try:
        yield ServiceHandle(url, wait)
    finally:
        stop_process(proc)


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


def planned_stages(cfg: ExperimentConfig) -> list[str]:
    """The names of the timed stages `run_experiment` runs for `cfg`, in order (timings.json's keys; the README
    lists the demo's, and a test keeps the two in step)."""
    runs = [f"{v}-{c}" for v in [*cfg.variants, *cfg.composed] for c in cfg.conditions]
    return [
        "prepare data",
        *(f"train RM ({v})" for v in cfg.variants),
        "evaluate RMs",
        "start reward service",
        *(f"PPO {run}" for run in runs),
        "evaluate base",
        *(f"evaluate {run}" for run in runs),
        "compare",
    ]


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
        data_dir = run_isolated(_prepare, cfg, out)
    rm_dirs, rm_metrics = {}, {}
    for variant in cfg.variants:
        with Stage(f"train RM ({variant})", timings):
            rm_dirs[variant] = run_isolated(_train_rm, cfg, data_dir, out / "rm" / variant, variant)
    for name, spec in cfg.composed.items():  # no training: a definition over the variants just trained
        rm_dirs[name] = write_compose_folder(spec, out / "rm" / name)
    policies: dict[str, Path] = {}
    # the service loads (imports, models: ~30 s on 2 cores) while the RMs are evaluated
    with reward_service(
        rm_dirs,
        default=cfg.judge,
        log_file=out / "logs" / "reward_service.log",
        flags=cfg.serve_flags(),
        port=cfg.serve.get("port"),
    ) as service:
        with Stage("evaluate RMs", timings):  # every variant on the same rows: their differences are paired
            joint = run_isolated(
                _eval_rm, cfg, data_dir, [rm_dirs[v] for v in cfg.variants], out / "rm" / "eval"
            )
            rm_metrics = {variant: joint for variant in cfg.variants}
        with Stage("start reward service", timings):  # what is left of its start-up after the RM evaluation
            url = service.ready()
        for variant in [*cfg.variants, *cfg.composed]:
            for cond, spec in cfg.conditions.items():
                run = f"{variant}-{cond}"
                with Stage(f"PPO {run}", timings):
                    policies[run] = run_isolated(
                        _train_policy, cfg, data_dir, spec, f"{url}/models/{variant}", out / "policies" / run
                    )
        eval_dir = out / "eval"
        judge_url = f"{url}/models/{cfg.judge}"
        base_model = cfg.train.model.policy
        with Stage("evaluate base", timings):
            run_isolated(_eval_policy, cfg, base_model, eval_dir / "base", judge_url, data_dir)
        for run, path in policies.items():
            with Stage(f"evaluate {run}", timings):
                run_isolated(_eval_policy, cfg, str(path), eval_dir / run, judge_url, data_dir)

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
        composed = {}  # claim 6: each composed reward's policy against the policy of the variant it builds on
        for name in cfg.composed:
            base = cfg.composed_base(name)
            composed[name] = {
                cond: compare(
                    eval_dir / f"{base}-{cond}",
                    eval_dir / f"{name}-{cond}",
                    names=[f"{name}-{cond}"],
                    out=out / "compare" / f"{name}-{cond}_vs_{base}-{cond}",
                    seed=cfg.seed,
                    plots=False,
                )
                for cond in cfg.conditions
            }
    training = {run: training_summary(path) for run, path in policies.items()}
    for stage, seconds in previous.items():
        if stage != "total" and timings.get(stage, 0.0) < 1.0 and seconds >= 1.0:
            timings[stage] = seconds
    timings["total"] = round(time.perf_counter() - t_start, 1)
    if previous:
        timings["total (this run, resumed)"] = timings.pop("total")
        if "total" in previous:  # the run that did the work
            timings = {"total": previous["total"], **timings}
    report = write_report(cfg, out, rm_metrics, comparison, training, timings, head_to_head, composed)
    log.info("experiment report: %s", report)
    return report


def _prepare(cfg: ExperimentConfig, out: Path) -> Path:
    if isinstance(cfg.data, PreparedData):
        d = Path(cfg.data.prepared)
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

    options = cfg.data.model_dump()
    if "seed" not in cfg.data.model_fields_set:
        options["seed"] = cfg.seed
    card = prepare(**{**options, "out": str(d)})
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

    options = cfg.rm.model_dump(exclude_unset=True, exclude={"variants"})
    options.setdefault("seed", cfg.seed)
    return train_rm(data_dir, dest, variant=variant, **options)


def _eval_rm(cfg: ExperimentConfig, data_dir: Path, model: Path | list[Path], dest: Path) -> dict[str, Any]:
    if (dest / "metrics.json").exists():
        return json.loads((dest / "metrics.json").read_text())
    from karma.rm.evaluate import evaluate_rm

    ev = cfg.rm_eval
    return evaluate_rm(
        model,
        data_dir,
        ev.split,
        out=dest,
        seed=cfg.seed,
        **ev.limits(),
        baselines=ev.baselines,
        subreddits=ev.subreddits or None,
        exclude_subreddits=ev.exclude_subreddits or None,
    )


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
        cfg.train.model_dump(exclude_unset=True),
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

    options = cfg.eval.model_dump(exclude_unset=True, exclude={"model", "out", "reward_url", "threads"})
    options.setdefault("seed", cfg.seed)
    return run_eval(model, out=dest, reward_url=reward_url, **options)
