"""`compare`: a base policy against one or more trained ones, on the items both evaluations scored.

For every row of the results table (task, pooled family, suite mean) and metric: both values on the paired
items, the difference (trained - base) with a paired-bootstrap 95 % CI, a paired test (exact McNemar for
0/1 scores, paired permutation otherwise) and the minimum detectable effect of that test at 80 % power
(`mde`, with the discordance it used for 0/1 scores; see `karma.eval.power`). Items pair by id and must
have shown the model the same prompt and options (the stored item hash); others are dropped and counted.
The continuous, label-prior-controlled `p_correct_cal` (results format 2) gets the same treatment as every
other continuous score: paired bootstrap CI, paired permutation test, paired-t MDE (`power.observed_mde`;
`power.suite_mde` for a suite mean). Results of different formats are not paired (refused).
Writes compare.json, compare.md (one table, the shape of the paper's results table) and compare.png (the
deltas with their CIs).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from karma.eval import metrics as M
from karma.eval import power as P
from karma.eval.report import GEN_METRICS, MC_METRICS, error_bars, fmt_ci
from karma.eval.run import RESULTS_FORMAT_VERSION, row_groups


def load_results(source: str | Path | dict) -> dict:
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"no results.json at {path} (run `karma eval --out DIR` first)")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "tasks" not in data or "format_version" not in data:
        raise ValueError(f"{path} is not a `karma eval` results.json")
    if data["format_version"] > RESULTS_FORMAT_VERSION:
        raise ValueError(
            f"{path}: results format {data['format_version']} is newer than this karma reads "
            f"({RESULTS_FORMAT_VERSION}); update karma"
        )
    data.setdefault("_source", str(path.parent))
    return data


def check_formats(base: dict, trained: Sequence[dict]) -> None:
    """Refuse to pair results of different formats or prompt formats, saying which run to redo."""
    for r in trained:
        if r.get("prompt_format_version") != base.get("prompt_format_version"):
            raise ValueError(
                "results of different prompt format versions cannot be paired; re-run `karma eval`"
            )
    versions = [(_where(r), r.get("format_version")) for r in (base, *trained)]
    if len({v for _, v in versions}) > 1:
        old = [w for w, v in versions if v != RESULTS_FORMAT_VERSION]
        raise ValueError(
            "results of different formats cannot be paired ("
            + ", ".join(f"{w}: format {v}" for w, v in versions)
            + "); format 2 adds the content-free (calibration) scores p_correct_cal and hashes the content-free "
            f"prompt into each item's key, so no item pairs across formats; re-run `karma eval` for {', '.join(old)}"
        )


def _where(results: dict) -> str:
    return str(results.get("_source") or results["model"]["name"])


def _paired_items(base: dict, new: dict) -> tuple[list[dict], list[dict], int]:
    by_id = {it["id"]: it for it in new["items"]}
    b_items, n_items, mismatched = [], [], 0
    for it in base["items"]:
        other = by_id.get(it["id"])
        if other is None:
            continue
        if other.get("key") != it.get("key"):
            mismatched += 1
            continue
        b_items.append(it)
        n_items.append(other)
    return b_items, n_items, mismatched


def _values(items: list[dict], metric: str) -> list:
    return (
        [it["reply"] for it in items]
        if metric in M.CORPUS_METRICS
        else [it["scores"][metric] for it in items]
    )


def compare(
    base_results: str | Path | dict,
    *trained_results: str | Path | dict,
    out: str | Path | None = None,
    names: Sequence[str] | None = None,
    n_boot: int = 1000,
    n_perm: int = 10000,
    seed: int = 0,
    plots: bool = True,
) -> dict[str, Any]:
    """Compare trained policies with a base; returns the comparison dict (also written under `out`)."""
    if not trained_results:
        raise ValueError("compare needs a base and at least one trained results folder")
    base = load_results(base_results)
    trained = [load_results(r) for r in trained_results]
    labels = list(names) if names else [_label(r, i) for i, r in enumerate(trained)]
    if len(labels) != len(trained):
        raise ValueError(f"{len(labels)} names for {len(trained)} trained results")
    if len(set(labels)) != len(labels):
        labels = [f"{lab}#{i + 1}" for i, lab in enumerate(labels)]
    check_formats(base, trained)

    common = [t for t in base["tasks"] if all(t in r["tasks"] for r in trained)]
    rows_out = []
    for row in row_groups({t: base["tasks"][t] for t in common}):
        first = base["tasks"][row["tasks"][0]]
        metrics = row.get("metrics") or [m for m in (*MC_METRICS, *GEN_METRICS) if m in first["metrics"]]
        for metric in metrics:
            entry = {
                "row": row["row"],
                "suite": row["suite"],
                "kind": row["kind"],
                "metric": metric,
                "models": {},
            }
            for label, res in zip(labels, trained, strict=True):
                if not all(metric in res["tasks"][t]["metrics"] for t in row["tasks"]):
                    continue
                entry["models"][label] = _compare_row(base, res, row, metric, n_boot, n_perm, seed)
            if entry["models"]:
                rows_out.append(entry)
    result = {
        "base": {"name": base["model"]["name"], "path": base["model"]["path"], "source": base.get("_source")},
        "trained": [
            {"label": lab, "name": r["model"]["name"], "path": r["model"]["path"], "source": r.get("_source")}
            for lab, r in zip(labels, trained, strict=True)
        ],
        "only_in_some": sorted({t for r in [base, *trained] for t in r["tasks"]} - set(common)),
        "settings": {"n_boot": n_boot, "n_perm": n_perm, "seed": seed},
        "rows": rows_out,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(result, indent=1, allow_nan=True))
        (out / "compare.md").write_text(markdown(result))
        if plots:
            plot_compare(result, out / "compare.png")
    return result


def _label(results: dict, i: int) -> str:
    src = results.get("_source")
    return Path(src).name if src else f"{results['model']['name']}#{i + 1}"


def _compare_row(base: dict, new: dict, row: dict, metric: str, n_boot: int, n_perm: int, seed: int) -> dict:
    units = row.get("units") or [row["tasks"]]
    pairs, mismatched = [], 0
    for unit in units:
        b_items, n_items, bad = [], [], 0
        for t in unit:
            b, n, k = _paired_items(base["tasks"][t], new["tasks"][t])
            b_items += b
            n_items += n
            bad += k
        pairs.append((b_items, n_items))
        mismatched += bad
    if row["kind"] == "suite":
        vals = [(_values(b, metric), _values(n, metric)) for b, n in pairs]
        d = M.paired_mean_of_means(vals, n_boot=n_boot, n_perm=n_perm, seed=seed)
        base_v = M.mean_of_means_ci([b for b, _ in vals], n_boot=n_boot, seed=seed)
        new_v = M.mean_of_means_ci([n for _, n in vals], n_boot=n_boot, seed=seed)
        power = P.suite_mde(vals, binary=metric in M.BINARY_METRICS)
    else:
        b_items, n_items = pairs[0]
        bv, nv = _values(b_items, metric), _values(n_items, metric)
        corpus = M.corpus_metric(metric) if metric in M.CORPUS_METRICS else None
        d = M.paired_delta(
            bv, nv, corpus=corpus, binary=metric in M.BINARY_METRICS, n_boot=n_boot, n_perm=n_perm, seed=seed
        )
        if corpus is None:
            base_v, new_v = M.mean_ci(bv, n_boot=n_boot, seed=seed), M.mean_ci(nv, n_boot=n_boot, seed=seed)
            power = P.observed_mde(bv, nv, binary=metric in M.BINARY_METRICS)
        else:
            base_v = M.jackknife_ci(lambda idx: corpus([bv[i] for i in idx]), len(bv))
            new_v = M.jackknife_ci(lambda idx: corpus([nv[i] for i in idx]), len(nv))
            power = P.corpus_mde(d["ci_low"], d["ci_high"], len(bv))
    return {"base": base_v, "trained": new_v, **d, **power, "mismatched_items": mismatched}


def _fmt(x: float, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _fmt_delta(c: dict) -> str:
    if c["n"] == 0:
        return "—"
    star = "*" if c["p"] < 0.05 else ""
    return f"{c['delta']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]{star}"


def fmt_mde(x: float | None) -> str:
    """An MDE cell: '0.057', '∞' (nothing detectable at this n), '—' (undefined)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if math.isinf(x):
        return "∞"
    return f"{x:.3f}" if x == 0 or x >= 0.001 else f"{x:.2g}"


def _fmt_p(p: float) -> str:
    return "—" if p is None or math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else "<0.001")


def markdown(result: dict) -> str:
    labels = [t["label"] for t in result["trained"]]
    head = ["suite", "task", "metric", "n", f"base ({result['base']['name']})"]
    for lab in labels:
        head += [lab, f"Δ {lab} [95% CI]", "p", "MDE"]
    lines = [
        f"# Base `{result['base']['name']}` vs {', '.join(f'`{lab}`' for lab in labels)}",
        "",
        (
            "Values on the items both runs scored: `mean [95% bootstrap CI]`; Δ = trained − base with a paired "
            "bootstrap CI; p: exact McNemar for 0/1 scores (acc, acc_norm, mc1), paired permutation otherwise; "
            "`*` marks p < 0.05 (uncorrected for the number of rows). `p_correct`: probability mass on the "
            "correct option(s); `p_correct_cal`: the same after contextual calibration against the task's "
            "content-free prompt (a label prior cancels) — continuous, so it moves when no answer flips. "
            "MDE: the smallest |Δ| that test detects "
            "with 80 % power at two-sided α = 0.05 — exact McNemar at the observed discordance (the share of "
            "items whose score changed; with none, the floor of every change moving one way) for 0/1 scores, "
            "paired t with the observed sd of the differences otherwise, normal with per-task discordance for "
            "the suite mean; ∞: nothing is detectable at this n. A Δ that is not significant rules out effects "
            "larger than the MDE, not smaller ones."
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in result["rows"]:
        any_c = next(iter(r["models"].values()))
        name = r["row"] if r["kind"] == "task" else f"**{r['row']}**"
        cells = [r["suite"], name, r["metric"], str(any_c["n"]), fmt_ci(any_c["base"])]
        for lab in labels:
            c = r["models"].get(lab)
            cells += (
                [fmt_ci(c["trained"]), _fmt_delta(c), _fmt_p(c["p"]), fmt_mde(c.get("mde"))]
                if c
                else ["—", "—", "—", "—"]
            )
        lines.append("| " + " | ".join(cells) + " |")
    if result["only_in_some"]:
        lines += ["", f"Not compared (not in every run): {', '.join(result['only_in_some'])}"]
    bad = sum(c["mismatched_items"] for r in result["rows"] for c in r["models"].values())
    if bad:
        lines += ["", f"{bad} item(s) dropped: same id but a different prompt/options in the two runs"]
    return "\n".join(lines) + "\n"


def plot_compare(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [t["label"] for t in result["trained"]]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    step = 0.7 / max(len(labels), 1)
    for j, lab in enumerate(labels):
        for i, r in enumerate(rows):
            c = r["models"].get(lab)
            if not c or c["n"] == 0:
                continue
            scale = _scale(r, c)
            y = len(rows) - 1 - i + (j - (len(labels) - 1) / 2) * step
            ax.errorbar(
                c["delta"] / scale,
                y,
                xerr=error_bars({"value": c["delta"], "ci_low": c["ci_low"], "ci_high": c["ci_high"]}, scale),
                fmt="o",
                ms=3,
                color=colors[j % len(colors)],
                capsize=2,
                lw=1,
                label=lab if i == 0 else None,
            )
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_yticks(
        range(len(rows))[::-1],
        [f"{r['row']} · {r['metric']}" + ("" if _scale(r, None) == 1 else " (rel.)") for r in rows],
        fontsize=7,
    )
    ax.set_xlabel("Δ trained − base (95% paired bootstrap CI); lengths/reward as Δ / |base|")
    ax.set_title(f"vs base {result['base']['name']}", fontsize=9)
    if labels:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _scale(row: dict, c: dict | None) -> float:
    """Unbounded metrics (lengths, reward) are plotted relative to |base| so they share the axis."""
    if row["metric"] not in ("length_words", "length_tokens", "reward"):
        return 1.0
    if c is None:
        return 0.0
    b = abs(c["base"]["value"])
    return b if b > 1e-9 else 1.0
