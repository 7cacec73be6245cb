"""report.md and the PNG plots of one evaluation (matplotlib imported only when plotting)."""

from __future__ import annotations

import math
from pathlib import Path

MC_METRICS = ("acc", "acc_norm", "mc1", "mc2", "p_correct", "p_correct_cal")
#: metrics whose chance level the tables show (p_correct's is acc's; TruthfulQA's is mc2's)
CHANCE_METRICS = ("acc", "mc1", "mc2")
GEN_METRICS = ("reward", "length_words", "length_tokens", "distinct_1", "distinct_2", "rep_4")
METRIC_DOC = {
    "acc": "argmax of summed log-likelihood is correct",
    "acc_norm": "argmax of log-likelihood per character is correct",
    "mc1": "TruthfulQA MC1: argmax of summed log-likelihood is the one true answer",
    "mc2": "TruthfulQA MC2: normalised probability mass on the true answers",
    "p_correct": "probability mass on the correct option(s): softmax of the options' log-likelihoods "
    "(TruthfulQA: over MC2's options, = mc2)",
    "p_correct_cal": "p_correct after contextual calibration: softmax of log-likelihood minus the option's "
    "log-likelihood after the task's content-free prompt (the item's text replaced by 'N/A'); a label prior "
    "cancels",
    "reward": "reward service score of (prompt, reply)",
    "length_words": "reply length in words",
    "length_tokens": "reply length in tokens (EOS excluded)",
    "distinct_1": "distinct unigrams / all unigrams over all replies (CI: delete-one jackknife)",
    "distinct_2": "distinct bigrams / all bigrams over all replies (CI: delete-one jackknife)",
    "rep_4": "share of a reply's 4-grams repeating an earlier one (seq-rep-4)",
}


def fmt_ci(m: dict | None, digits: int = 3) -> str:
    if not m or m.get("n", 0) == 0 or m["value"] is None or math.isnan(m["value"]):
        return "—"
    return f"{m['value']:.{digits}f} [{m['ci_low']:.{digits}f}, {m['ci_high']:.{digits}f}]"


def _row_label(row: dict) -> str:
    return f"**{row['row']}**" if row["kind"] != "task" else row["row"]


def markdown(results: dict) -> str:
    tasks = results["tasks"]
    s = results["settings"]
    t = results["timing"]
    model = results["model"]
    lines = [
        f"# Evaluation of `{model['name']}`",
        "",
        f"- model folder: `{model['path']}`"
        + (f" (LoRA adapter on `{model['base']}`)" if model.get("base") else ""),
        (
            f"- device {s['device']}, dtype {s['dtype']}, batch size {s['batch_size']}, "
            f"limit {s['limit'] if s['limit'] else 'none (full tasks)'}"
            + "".join(f", {k}: {v if v else 'all'}" for k, v in (s.get("task_limits") or {}).items())
        ),
        (
            f"- {t.get('options_scored', 0)} (prompt, option) pairs scored in {t.get('score_s', 0):.0f} s "
            f"({t.get('options_per_s', float('nan')):.1f}/s), {t.get('content_free_options', 0)} of them "
            f"after {t.get('content_free_prompts', 0)} content-free prompts (calibration); "
            f"total {t.get('total_s', 0):.0f} s"
        ),
        (
            "- multiple choice: log-likelihood of each option given the prompt, no chat template "
            "(lm-evaluation-harness's default); values are `mean [95% bootstrap CI]`, n = items; "
            "chance: acc (mc1 / mc2 for TruthfulQA) of a uniform guess"
        ),
        "",
    ]
    summary = results["summary"]
    for suite in dict.fromkeys(r["suite"] for r in summary):
        rows = [r for r in summary if r["suite"] == suite and tasks[r["tasks"][0]]["kind"] != "generation"]
        if rows:
            cols = [m for m in MC_METRICS if any(m in r["metrics"] for r in rows)]
            lines += [
                f"## {suite}",
                "",
                "| task | n | chance | " + " | ".join(cols) + " |",
                "|---|---:|---|" + "---|" * len(cols),
            ]
            for r in rows:
                n = max((m["n"] for m in r["metrics"].values()), default=0)
                chance = " / ".join(
                    f"{r['chance'][c]:.3f}" for c in cols if c in r["chance"] and c in CHANCE_METRICS
                )
                cells = [fmt_ci(r["metrics"].get(c)) for c in cols]
                lines.append(f"| {_row_label(r)} | {n} | {chance} | " + " | ".join(cells) + " |")
            lines.append("")
        for r in summary:
            if r["suite"] == suite and tasks[r["tasks"][0]]["kind"] == "generation":
                lines += generation_markdown(tasks[r["row"]], s)
    lines += ["## Metrics", ""] + [f"- `{k}`: {v}" for k, v in METRIC_DOC.items()] + [""]
    return "\n".join(lines)


def generation_markdown(entry: dict, settings: dict, n_examples: int = 3) -> list[str]:
    g = settings["generation"]
    lines = [
        f"### generated replies ({entry['n']} prompts: {entry['source']})",
        "",
        f"chat template {'on' if g['chat_template'] else 'off'}, max_new_tokens {g['max_new_tokens']}, "
        + (
            f"sampling (temperature {g['temperature']}, top_p {g['top_p']}, seed {g['seed']})"
            if g["temperature"] > 0
            else "greedy"
        ),
        "",
    ]
    if entry.get("reward_model"):
        rm = entry["reward_model"]
        lines.append(f"reward service `{rm['url']}`, model `{rm['model']}` version `{rm['version']}`")
    else:
        lines.append("no reward service given (`--reward-url`): no reward column")
    lines += ["", "| metric | value [95% CI] | n |", "|---|---|---:|"]
    for m in GEN_METRICS:
        if m in entry["metrics"]:
            lines.append(f"| {m} | {fmt_ci(entry['metrics'][m])} | {entry['metrics'][m]['n']} |")
    lines += ["", "Examples:", ""]
    for it in entry["items"][:n_examples]:
        prompt = it["prompt"].replace("\n", " ")[:200]
        reply = it["reply"].replace("\n", " ")[:300]
        lines += [f"> **prompt:** {prompt}", ">", f"> **reply:** {reply}", ""]
    return lines


def write_report(results: dict, out: Path, *, plots: bool = True) -> list[Path]:
    out = Path(out)
    (out / "report.md").write_text(markdown(results))
    written = [out / "report.md"]
    if plots:
        written += plot_results(results, out)
    return written


def error_bars(v: dict, scale: float = 1.0) -> list[list[float]]:
    """Error-bar lengths below/above the value (never negative, whatever interval method made the CI)."""
    return [[max(v["value"] - v["ci_low"], 0.0) / scale], [max(v["ci_high"] - v["value"], 0.0) / scale]]


def plot_results(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    paths = []
    bars = [
        (r, m)
        for r in results["summary"]
        if tasks[r["tasks"][0]]["kind"] != "generation"
        for m in MC_METRICS
        if m in r["metrics"] and r["metrics"][m]["n"]
    ]
    if bars:
        colors = {
            "acc": "tab:blue",
            "acc_norm": "tab:cyan",
            "mc1": "tab:red",
            "mc2": "tab:orange",
            "p_correct": "tab:purple",
            "p_correct_cal": "tab:green",
        }
        fig, ax = plt.subplots(figsize=(8, 0.28 * len(bars) + 1.2))
        y = list(range(len(bars)))[::-1]
        for yi, (r, m) in zip(y, bars, strict=False):
            v = r["metrics"][m]
            ax.barh(yi, v["value"], color=colors[m], alpha=0.85)
            ax.errorbar(v["value"], yi, xerr=error_bars(v), color="black", capsize=2, lw=1)
            if m in r["chance"]:
                ax.plot([r["chance"][m]] * 2, [yi - 0.4, yi + 0.4], color="gray", ls=":", lw=1)
        ax.set_yticks(y, [f"{r['row']} · {m}" for r, m in bars], fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_xlabel("score (bars: 95% bootstrap CI; dotted: chance)")
        ax.set_title(f"{results['model']['name']}: multiple-choice tasks", fontsize=9)
        fig.tight_layout()
        paths.append(out / "mc_tasks.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    gen = [e for e in tasks.values() if e["kind"] == "generation"]
    if gen:
        ms = [m for m in GEN_METRICS if m in gen[0]["metrics"]]
        fig, axes = plt.subplots(1, len(ms), figsize=(2.1 * len(ms), 2.6))
        for ax, m in zip(axes if len(ms) > 1 else [axes], ms, strict=False):
            v = gen[0]["metrics"][m]
            ax.bar([0], [v["value"]], color="tab:green", alpha=0.85)
            ax.errorbar([0], [v["value"]], yerr=error_bars(v), color="black", capsize=3)
            ax.set_xticks([])
            ax.set_title(m, fontsize=8)
        fig.suptitle(f"{results['model']['name']}: generated replies (n={gen[0]['n']})", fontsize=9)
        fig.tight_layout()
        paths.append(out / "generation.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
