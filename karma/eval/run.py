"""`run_eval`: parse the tasks, check and load the model, score every option in batches, generate replies,
score them with the reward service, and write results.json, report.md and the plots.

results.json keeps every item's scores (keyed by item id, with a hash of what the model was shown) so
`compare` can pair a trained policy's items with the base model's.

Results format 2 (`RESULTS_FORMAT_VERSION`) adds, per multiple-choice item, `cf_ll` (each option's
log-likelihood after the task's content-free prompt; TruthfulQA also `mc2_cf_ll`) and the continuous scores
`p_correct` and `p_correct_cal` (see `karma.eval.metrics`); per task `content_free_prompts`; in `timing`,
`content_free_options` and `content_free_prompts`. Format-1 files still load; `compare` refuses to pair
them with format-2 ones (the item hashes differ: format 2 also hashes the content-free prompt).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from karma.config import Cli
from karma.eval import metrics as M
from karma.eval.tasks import (
    PROMPT_FORMAT_VERSION,
    Task,
    content_free_requests,
    item_key,
    join,
    load_tasks,
    requests,
)

log = logging.getLogger(__name__)

#: 2: content-free log-likelihoods and p_correct / p_correct_cal per multiple-choice item
RESULTS_FORMAT_VERSION = 2
#: the multiple-choice metrics in table order
MC_METRIC_ORDER = ("acc", "acc_norm", "mc1", "mc2", "p_correct", "p_correct_cal")
GENERATION_MEAN_METRICS = ("length_words", "length_tokens", "rep_4", "reward")


def parse_task_limits(value: Any) -> Any:
    """`["implicatures=200", "social_iqa=all"]` (the flag, repeatable) -> {"implicatures": 200, "social_iqa":
    None}; a mapping passes through (the file)."""
    if value is None or isinstance(value, dict):
        return value or {}
    out: dict[str, int | None] = {}
    for spec in [value] if isinstance(value, str) else value:
        name, sep, n = str(spec).partition("=")
        n = n.strip()
        if not sep or not name.strip() or not (n == "all" or (n.isdigit() and int(n) >= 1)):
            raise ValueError(f"--task-limit {spec!r}: expected NAME=N (N >= 1) or NAME=all")
        out[name.strip()] = None if n == "all" else int(n)
    return out


class PolicyEvalConfig(BaseModel):
    """Everything `karma eval` (and the experiment's `eval:`) can be told: which tasks, which model, how to
    score and generate. `run_eval(**cfg.model_dump())` runs it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("smollm2", description="causal LM folder (full or LoRA adapter), hub id, or 'smollm2'")
    suites: Annotated[str | None, Cli("--suite")] = Field(
        None,
        description="comma-separated suites (pragmatics, side_effects, factuality, all) and/or task names "
        "(unset: pragmatics,side_effects,factuality; none when --task is given)",
    )
    task_paths: Annotated[list[Path], Cli("--task")] = Field(
        default_factory=list,
        description="a BIG-bench task by path (task.json, another .json in its format, or a folder holding "
        "task.json); repeatable; evaluated beside --suite, or alone",
    )
    limit: int | None = Field(None, ge=1, description="first N items of each task (smoke runs)")
    task_limits: Annotated[dict[str, int | None], Cli("--task-limit")] = Field(
        default_factory=dict,
        description="NAME=N or NAME=all: items of one task, family or subtask, overriding --limit; repeatable",
    )
    out: Path | None = Field(None, description="output folder: results.json, report.md, *.png")
    reward_url: Annotated[str | None, Cli(env=("KARMA_REWARD_URL",))] = Field(
        None, description="reward service URL(s), comma-separated, to score generated replies"
    )
    reward_api_key: Annotated[str | None, Cli(env=("KARMA_REWARD_API_KEY",))] = Field(
        None, description="bearer token of the reward service"
    )
    reward_model: str | None = Field(None, description="model name on a multi-model reward service")
    reward_normalize: bool = Field(False, description="ask the service for normalised scores")
    prompts: Path | None = Field(
        None,
        description="held-out prompts for the generation metrics: one per line, or .jsonl with a 'prompt' "
        "field (unset: the politeness-corpus hold-out)",
    )
    n_prompts: int = Field(32, ge=1, description="prompts taken from the default hold-out")
    data_dir: Annotated[Path | None, Cli(env=("KARMA_SHARED_DATA",))] = Field(
        None, description="shared data folder holding eval/ (unset: ../shared/data)"
    )
    batch_size: int = Field(16, ge=1, description="(prompt, option) pairs per forward pass")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: fp32 on CPU, bf16 on GPU"
    )
    max_new_tokens: int = Field(64, ge=1, description="generated reply length limit (tokens)")
    gen_batch_size: int = Field(16, ge=1, description="prompts per generate() call")
    temperature: float = Field(0.7, ge=0, description="sampling temperature (0 = greedy)")
    top_p: float = Field(0.9, ge=0, le=1, description="nucleus sampling")
    chat_template: bool | None = Field(
        None, description="wrap generation prompts in the chat template (unset: if the model has one)"
    )
    seed: int = Field(0, description="seed of sampling and of the bootstrap")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (unset: torch's choice)")
    n_boot: int = Field(1000, ge=100, description="bootstrap resamples per CI")
    progress: bool = Field(True, description="progress bars")

    @field_validator("task_limits", mode="before")
    @classmethod
    def _task_limits(cls, value: Any) -> Any:
        return parse_task_limits(value)

    def run_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`run_eval` (`threads` is the caller's: it sets torch's)."""
        return self.model_dump(exclude={"threads"})


def run_eval(
    model: str = "smollm2",
    suites: str | Sequence[str] | None = None,
    limit: int | None = None,
    out: str | Path = "eval_out",
    reward_url: str | None = None,
    prompts: Sequence[str] | str | Path | None = None,
    *,
    task_paths: Sequence[str | Path] = (),
    task_limits: dict[str, int | None] | None = None,
    data_dir: str | Path | None = None,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "auto",
    n_prompts: int = 32,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    top_p: float = 0.9,
    gen_batch_size: int = 16,
    chat_template: bool | None = None,
    reward_api_key: str | None = None,
    reward_model: str | None = None,
    reward_normalize: bool = False,
    seed: int = 0,
    n_boot: int = 1000,
    progress: bool = True,
    plots: bool = True,
    lm=None,
) -> dict[str, Any]:
    """Evaluate one causal LM; returns the results dict also written to `out/results.json`.

    `suites`: "pragmatics,side_effects,factuality" (the default; none when only `task_paths` are given),
    "all", or task names. `task_paths`: BIG-bench task files / folders evaluated by path (suite `custom`).
    `limit`: the first N items of each task (subtask); `task_limits`: per task, family or subtask name, N or
    None (every item), overriding `limit`. `prompts`: held-out prompts for the generation metrics (list or
    file; default: the politeness hold-out). `reward_url`: a reward service to score the replies with.
    `lm`: an already loaded `CausalLM` (skips loading `model`).
    """
    from karma.eval.scoring import CausalLM, inspect_model

    t0 = time.perf_counter()
    tasks = load_tasks(
        suites,
        limit=limit,
        task_limits=task_limits,
        task_paths=[str(p) for p in task_paths],
        data_dir=data_dir,
        prompts=prompts,
        n_prompts=n_prompts,
    )
    spec = inspect_model(model) if lm is None else None
    if reward_url and any(t.kind == "generation" for t in tasks):
        # fail now, not after an hour of scoring, if the reward service is not there
        asyncio.run(check_reward_service(reward_url, reward_api_key, reward_model))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}

    t = time.perf_counter()
    if lm is None:
        lm = CausalLM.load(spec, device=device, dtype=dtype)
    timing["load_s"] = time.perf_counter() - t

    # the items' own (prompt, option) pairs, then the calibration controls: each (content-free prompt, option)
    # pair once (a task's items share their content-free prompt), all in one call
    own = requests(tasks)
    cf_reqs = content_free_requests(tasks, exclude=own)
    reqs = own + cf_reqs
    t = time.perf_counter()
    scored = dict(zip(reqs, lm.loglikelihood(reqs, batch_size=batch_size, progress=progress), strict=True))
    timing["score_s"] = time.perf_counter() - t
    timing["options_scored"] = len(reqs)
    timing["content_free_options"] = len(cf_reqs)
    timing["content_free_prompts"] = len({c for c, _ in cf_reqs})
    timing["options_per_s"] = len(reqs) / timing["score_s"] if reqs and timing["score_s"] > 0 else math.nan

    gen_settings = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "batch_size": gen_batch_size,
        "chat_template": bool(lm.tokenizer.chat_template) if chat_template is None else chat_template,
    }
    entries: dict[str, dict] = {}
    for task in tasks:
        if task.kind == "generation":
            t = time.perf_counter()
            entries[task.name] = _generation_entry(
                task,
                lm,
                gen_settings,
                progress,
                reward_url,
                reward_api_key,
                reward_model,
                reward_normalize,
                timing,
                n_boot,
                seed,
            )
            timing["generate_s"] = time.perf_counter() - t - timing.get("reward_s", 0.0)
        else:
            entries[task.name] = _mc_entry(task, scored, n_boot, seed)
    timing["total_s"] = time.perf_counter() - t0

    results = {
        "format_version": RESULTS_FORMAT_VERSION,
        "prompt_format_version": PROMPT_FORMAT_VERSION,
        "model": {
            "name": model,
            "path": spec.path if spec is not None else lm.name,
            "base": spec.base if spec is not None else None,
            "architectures": list(spec.architectures) if spec is not None else [],
        },
        "settings": {
            "suites": suites if isinstance(suites, str) or suites is None else list(suites),
            "limit": limit,
            "task_limits": dict(task_limits or {}),
            "task_paths": [str(p) for p in task_paths],
            "batch_size": batch_size,
            "device": str(lm.device),
            "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
            "mc_chat_template": False,
            "mc_bos": False,
            "generation": gen_settings,
            "reward_url": reward_url,
            "reward_normalize": reward_normalize,
            "n_boot": n_boot,
            "seed": seed,
        },
        "timing": timing,
        "tasks": entries,
    }
    results["summary"] = summarise(results, n_boot=n_boot, seed=seed)
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True))
    from karma.eval.report import write_report

    write_report(results, out, plots=plots)
    log.info("wrote %s (%.0f s, %d options scored)", out / "results.json", timing["total_s"], len(reqs))
    return results


# --------------------------------------------------------------------------------------------- per task
def _mc_entry(task: Task, scored: dict, n_boot: int, seed: int) -> dict:
    """One multiple-choice task's results: per item the options' log-likelihoods after the prompt (`ll`) and
    after the content-free prompt (`cf_ll`), and its scores; per task the metrics with bootstrap CIs.

    `p_correct` / `p_correct_cal` are over the options the task's own probability metric uses: BIG-bench's
    options (correct: those with the top target score), TruthfulQA's MC2 options (correct: its true set,
    so `p_correct` is `mc2`)."""
    items, chance = [], []
    for item in task.items:
        ll = {o: scored[join(item.prompt, o)] for o in item.continuations()}
        cf = {o: scored[join(item.cf_prompt, o)][0] for o in item.continuations()}
        opt_ll = [ll[o][0] for o in item.options]
        row: dict[str, Any] = {
            "id": item.id,
            "key": item_key(item),
            "ll": [round(x, 5) for x in opt_ll],
            "cf_ll": [round(cf[o], 5) for o in item.options],
            "n_tokens": [ll[o][1] for o in item.options],
            "correct": sorted(item.correct),
        }
        if task.kind == "truthfulqa":
            (correct,) = item.correct
            mc2_ll = [ll[o][0] for o in item.mc2_options]
            mc2_cf = [cf[o] for o in item.mc2_options]
            true = [i for i, t in enumerate(item.mc2_true) if t]
            row["mc2_ll"] = [round(x, 5) for x in mc2_ll]
            row["mc2_cf_ll"] = [round(x, 5) for x in mc2_cf]
            row["mc2_true"] = list(item.mc2_true)
            row["scores"] = {
                "mc1": M.mc1(opt_ll, correct),
                "mc2": M.mc2(mc2_ll, item.mc2_true),
                "p_correct": M.p_correct(mc2_ll, true),
                "p_correct_cal": M.p_correct(mc2_ll, true, content_free=mc2_cf),
            }
            c = sum(item.mc2_true) / len(item.mc2_true)
            chance.append({"mc1": 1 / len(item.options), "mc2": c, "p_correct": c, "p_correct_cal": c})
        else:
            opt_cf = [cf[o] for o in item.options]
            row["scores"] = {
                **M.mc_scores(opt_ll, [len(o) for o in item.options], item.correct),
                "p_correct": M.p_correct(opt_ll, item.correct),
                "p_correct_cal": M.p_correct(opt_ll, item.correct, content_free=opt_cf),
            }
            c = len(item.correct) / len(item.options)
            chance.append({"acc": c, "acc_norm": c, "p_correct": c, "p_correct_cal": c})
        items.append(row)
    metrics = {
        m: M.mean_ci([it["scores"][m] for it in items], n_boot=n_boot, seed=seed) for m in task.metric_names
    }
    return {
        "suite": task.suite,
        "kind": task.kind,
        "source": task.source,
        "n": len(items),
        "n_total": task.n_total,
        "chance": {m: float(np.mean([c[m] for c in chance])) for m in task.metric_names},
        "metrics": metrics,
        "content_free_prompts": sorted({item.cf_prompt for item in task.items}),
        "items": items,
    }


def _generation_entry(
    task, lm, settings, progress, reward_url, api_key, reward_model, normalize, timing, n_boot, seed
) -> dict:
    prompts = [it.prompt for it in task.items]
    gens = lm.generate(
        prompts,
        max_new_tokens=settings["max_new_tokens"],
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        seed=settings["seed"],
        batch_size=settings["batch_size"],
        chat_template=settings["chat_template"],
        progress=progress,
    )
    items = []
    for item, g in zip(task.items, gens, strict=True):
        items.append(
            {
                "id": item.id,
                "key": item_key(item),
                "prompt": item.prompt,
                "reply": g.text,
                "hit_max": g.hit_max,
                "scores": {
                    "length_words": float(len(M.words(g.text))),
                    "length_tokens": float(g.n_tokens),
                    "rep_4": M.rep_n(g.text, 4),
                },
            }
        )
    reward_info = None
    if reward_url:
        t = time.perf_counter()
        rewards, reward_info = asyncio.run(
            score_replies(
                reward_url, prompts, [it["reply"] for it in items], api_key, reward_model, normalize
            )
        )
        timing["reward_s"] = time.perf_counter() - t
        for it, r in zip(items, rewards, strict=True):
            it["scores"]["reward"] = r
    entry = {
        "suite": task.suite,
        "kind": "generation",
        "source": task.source,
        "n": len(items),
        "n_total": task.n_total,
        "chance": {},
        "reward_model": reward_info,
        "items": items,
    }
    entry["metrics"] = generation_metrics(items, n_boot=n_boot, seed=seed)
    return entry


def generation_metrics(items: list[dict], *, n_boot: int = 1000, seed: int = 0) -> dict:
    replies = [it["reply"] for it in items]
    out = {}
    for m in GENERATION_MEAN_METRICS:
        if items and all(m in it["scores"] for it in items):
            out[m] = M.mean_ci([it["scores"][m] for it in items], n_boot=n_boot, seed=seed)
    for m in M.CORPUS_METRICS:
        out[m] = _corpus_ci(M.corpus_metric(m), replies)
    return out


def _corpus_ci(fn, replies: list[str]) -> dict:
    return M.jackknife_ci(lambda idx: fn([replies[i] for i in idx]), len(replies))


async def check_reward_service(
    url: str, api_key: str | None, model: str | None, deadline_s: float = 60.0
) -> None:
    from karma.client import RewardClient

    async with RewardClient(url, api_key=api_key, model=model) as client:
        await client.wait_ready(deadline_s)


async def score_replies(
    url: str,
    prompts: Sequence[str],
    replies: Sequence[str],
    api_key: str | None,
    model: str | None,
    normalize: bool,
) -> tuple[list[float], dict]:
    """The reward service's scores of (prompt, reply), through `karma.client.RewardClient`."""
    from karma.client import RewardClient

    async with RewardClient(url, api_key=api_key, model=model) as client:
        result = await client.score(
            [{"context": p, "response": r} for p, r in zip(prompts, replies, strict=True)],
            normalize=normalize,
        )
    return [float(s) for s in result.scores], {"url": url, "model": result.model, "version": result.version}


# --------------------------------------------------------------------------------------------- summary rows
def row_groups(tasks: dict[str, dict]) -> list[dict]:
    """The rows of the results table: every task, a pooled row per family with several subtasks, and per
    suite the unweighted mean over its tasks (families counted once) of each metric they all report."""
    families: dict[str, list[str]] = {}
    for name in tasks:
        families.setdefault(name.split("/")[0], []).append(name)
    by_suite: dict[str, list[dict]] = {}
    for family, members in families.items():
        by_suite.setdefault(tasks[members[0]]["suite"], []).append(
            {"row": family, "suite": tasks[members[0]]["suite"], "kind": "family", "tasks": members}
        )
    rows: list[dict] = []
    for suite, units in by_suite.items():
        for unit in units:
            rows += [{"row": name, "suite": suite, "kind": "task", "tasks": [name]} for name in unit["tasks"]]
            if len(unit["tasks"]) > 1:
                rows.append(unit)
        mc_units = [u for u in units if tasks[u["tasks"][0]]["kind"] != "generation"]
        if len(mc_units) < 2:
            continue
        common = set.intersection(*(set(tasks[u["tasks"][0]]["metrics"]) for u in mc_units))
        if common:
            rows.append(
                {
                    "row": f"{suite} (mean of {len(mc_units)} tasks)",
                    "suite": suite,
                    "kind": "suite",
                    "tasks": [t for u in mc_units for t in u["tasks"]],
                    "units": [u["tasks"] for u in mc_units],
                    "metrics": sorted(common, key=MC_METRIC_ORDER.index),
                }
            )
    return rows


def item_values(tasks: dict[str, dict], names: Sequence[str], metric: str) -> list:
    """Per-item values of a metric pooled over tasks (replies for corpus-level metrics)."""
    if metric in M.CORPUS_METRICS:
        return [it["reply"] for n in names for it in tasks[n]["items"]]
    return [it["scores"][metric] for n in names for it in tasks[n]["items"]]


def summarise(results: dict, *, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    tasks = results["tasks"]
    out = []
    for row in row_groups(tasks):
        first = tasks[row["tasks"][0]]
        if row["kind"] == "task":
            metrics = first["metrics"]
            chance = first["chance"]
        elif row["kind"] == "family":
            metrics = {
                m: M.mean_ci(item_values(tasks, row["tasks"], m), n_boot=n_boot, seed=seed)
                for m in first["metrics"]
            }
            n = sum(tasks[t]["n"] for t in row["tasks"])
            chance = {
                m: sum(tasks[t]["chance"][m] * tasks[t]["n"] for t in row["tasks"]) / n
                for m in first["chance"]
            }
        else:
            metrics = {
                m: M.mean_of_means_ci(
                    [item_values(tasks, u, m) for u in row["units"]], n_boot=n_boot, seed=seed
                )
                for m in row["metrics"]
            }
            chance = {
                m: float(
                    np.mean(
                        [
                            sum(tasks[t]["chance"][m] * tasks[t]["n"] for t in u)
                            / sum(tasks[t]["n"] for t in u)
                            for u in row["units"]
                        ]
                    )
                )
                for m in row["metrics"]
            }
        out.append({**{k: v for k, v in row.items() if k != "units"}, "metrics": metrics, "chance": chance})
    return out
