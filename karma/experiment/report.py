"""experiment.md: the paper's claims, one by one, each a verdict with its n, CI, test and power."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from karma.eval.metrics import CALIBRATED_METRIC as CALIBRATED
from karma.experiment.config import ExperimentConfig

HELDOUT_FILE = (
    "heldout_reward.json"  # written by the trainer at the end of a completed run (services.policy_trainer)
)


def training_summary(policy_dir: Path) -> dict[str, Any]:
    """First/last logged reward and KL of a PPO run (the trainer's metrics.jsonl), the mean over steps of the
    reward's within- and across-prompt sd where the steps logged them (`reward_within_prompt_sd`,
    `reward_across_prompt_sd`; within only with samples_per_prompt >= 2, neither in older runs), and its
    held-out reward of base vs trained policy (`heldout_reward.json`, under `heldout`) when the run wrote one
    (older runs did not)."""
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
        for which in ("within", "across"):
            logged = [_num(r.get(f"reward/{which}_prompt_sd")) for r in rows]
            logged = [x for x in logged if x is not None and math.isfinite(x)]
            if logged:
                out[f"reward_{which}_prompt_sd"] = sum(logged) / len(logged)
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


SPREAD_NOTE = (
    "A reward that barely varies over the policy's own samples gives PPO a flat objective however well it "
    'predicts karma (Razin et al., "What Makes a Reward Model a Good Teacher?", arXiv 2503.15477). What to '
    "look for: if that is why a worse karma predictor trains better policies, the variant that wins claim 3 "
    "shows more **within-prompt** spread (how differently the RM scores a prompt's replies) at the same "
    "condition; across-prompt spread ranks the prompts, not the policy's replies."
)


def _reward_spread(cfg: ExperimentConfig, training: dict[str, dict[str, Any]]) -> list[str]:
    """Per PPO run (RM variant x condition): the reward's sd within and across prompts, over the training
    steps (mean over steps of metrics.jsonl's `reward/*_prompt_sd`) and on the held-out replies of the base
    and the trained policy (`heldout_reward.json`)."""
    if not training:
        return []

    def split(run: str) -> tuple[str, str]:
        for cond in cfg.conditions:
            if run.endswith(f"-{cond}"):
                return run[: -len(cond) - 1], cond
        return run, "—"

    def pair(h: dict[str, Any], which: str) -> str:
        b, t = _num(h.get(f"base_{which}_prompt_sd")), _num(h.get(f"trained_{which}_prompt_sd"))
        return "—" if b is None or t is None else f"{b:.3f} → {t:.3f}"

    lines = [
        "Reward spread per run (the reward's teaching signal): sd of the run's own RM scores within a "
        "prompt (mean over prompts of the sd of its replies' scores) and across prompts (sd of the "
        "per-prompt mean), during training (mean over steps; within only when a step samples 2+ replies per prompt) and "
        "on the held-out replies, base → trained policy (within only with `eval.heldout_samples` >= 2). "
        + SPREAD_NOTE,
        "",
        (
            "| RM | condition | training within-prompt sd | training across-prompt sd | held-out "
            "within-prompt sd base → trained | held-out across-prompt sd base → trained | held-out replies "
            "per prompt |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    order = {c: i for i, c in enumerate(cfg.conditions)}
    for run in sorted(training, key=lambda r: order.get(split(r)[1], len(order))):
        t = training[run]
        variant, cond = split(run)
        h = t.get("heldout")
        h = h if isinstance(h, dict) and "error" not in h else {}
        k = h.get("samples_per_prompt")
        lines.append(
            f"| `{variant}` | {cond} | {_fmt(_num(t.get('reward_within_prompt_sd')))} | "
            f"{_fmt(_num(t.get('reward_across_prompt_sd')))} | {pair(h, 'within')} | {pair(h, 'across')} | "
            f"{k if k is not None else '—'} |"
        )
    return lines + [""]


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
# MC2 and p_correct_cal probability mass): 5 points. A run whose MDE exceeds it could only have detected implausibly large
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


def _calibrated(table: dict[str, Any] | None) -> bool:
    """Whether a comparison has the calibrated score (results format 2); format-1 results decide on accuracy."""
    return bool(table) and any(r["metric"] == CALIBRATED for r in table["rows"])


def _measured_note(what: str) -> str:
    return (
        f"Measured: {what}, per run Δ = trained − base of `{CALIBRATED}` (probability on the correct option(s) "
        "after calibration against the task's content-free prompt) on paired items: 95 % paired-bootstrap CI, "
        f"paired permutation p, n items, MDE at {POWER * 100:g} % power. Accuracy beside it does not decide."
    )


def _legacy_note(what: str) -> str:
    return (
        f"(These results have no `{CALIBRATED}` (results format 1, before calibration): {what} decides; re-run "
        "`karma eval` for the calibrated score.)"
    )


def _calibrated_cell(
    table: dict[str, Any], row: dict[str, Any], run: str, beside: tuple[str, ...]
) -> tuple[dict[str, Any], str] | None:
    """`run`'s calibrated cell in `row` and its text: Δ p_correct_cal [CI] (p, n, MDE), then the `beside`
    metrics (accuracy, MC1, MC2) of the same row and run."""
    c = row["models"].get(run)
    if c is None:
        return None
    side = [
        f"{m} {_delta_cell(b['models'][run])}"
        for m in beside
        for b in _rows(table, suite=row["suite"], kind=row["kind"], row=row["row"], metric=m)
        if run in b["models"]
    ]
    text = f"Δ {CALIBRATED} {_delta_cell(c)}" + (f"; beside it: {'; '.join(side)}" if side else "")
    return c, text


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
    composed: dict[str, dict[str, Any]] | None = None,
    training: dict[str, dict[str, Any]] | None = None,
) -> list[str]:
    """The paper's claims, each stated from the numbers ("not reproduced" where that is what happened).

    `comparison`: every trained policy against the base (`karma eval compare`). `head_to_head`: per exposure
    condition, the `context` policy compared against the `full` one (the `full` policy as the "base"), for
    claim 3. `training`: per PPO run, `training_summary` (claim 3 shows each run's reward spread beside it).
    A claim counts as reproduced in a run only where the paired test is significant at p < ALPHA.
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

    # 2. Pragmatics up: decided on the calibrated probability of the correct option (accuracy beside it)
    lines.append("### 2. Pragmatics improve after KARMA training")
    if _calibrated(comparison):
        prag = _rows(comparison, suite="pragmatics", kind="suite", metric=CALIBRATED)
        flags, cells = [], []
        if prag:
            lines.append(_measured_note(f"{prag[0]['row']}, the unweighted mean of the task means"))
        for r in prag:
            for run in runs:
                got = _calibrated_cell(comparison, r, run, ("acc",))
                if got:
                    flags.append(_supports(got[0], +1))
                    cells.append(got[0])
                    lines.append(f"- `{run}`: {got[1]}")
        lines.append(
            _verdict(flags, "calibrated P(correct) on pragmatics went up", cells)
            if prag
            else "No pragmatics suite row to test."
        )
    else:
        prag = _rows(comparison, suite="pragmatics", kind="suite", metric="acc")
        flags, cells = [], []
        for r in prag:
            for run in runs:
                if run in r["models"]:
                    c = r["models"][run]
                    flags.append(_supports(c, +1))
                    cells.append(c)
                    lines.append(f"- `{run}`: Δ pragmatics accuracy (mean over tasks) {_delta_cell(c)}")
        if prag:
            lines += [_verdict(flags, "pragmatics accuracy went up", cells), _legacy_note("accuracy")]
        else:
            lines.append("No pragmatics suite row to test.")
    lines.append("")

    # 3. Context RM trains better policies
    lines.append("### 3. The text-only `context` RM trains better policies than the `full` RM")
    if {"full", "context"} <= set(cfg.variants):
        flags, cells = [], []
        legacy = False
        for cond in cfg.conditions:
            h2h = (head_to_head or {}).get(cond)
            run = f"context-{cond}"
            if h2h and _calibrated(h2h):
                rows = _rows(h2h, suite="pragmatics", kind="suite", metric=CALIBRATED)
                got = _calibrated_cell(h2h, rows[0], run, ("acc",)) if rows else None
                if got:
                    flags.append(_supports(got[0], +1))
                    cells.append(got[0])
                    lines.append(f"- {cond} prompts: pragmatics, `{run}` − `full-{cond}`: {got[1]}")
                    continue
            else:
                rows = _rows(h2h, suite="pragmatics", kind="suite", metric="acc") if h2h else []
                c = rows[0]["models"].get(run) if rows else None
                if c is not None:
                    legacy = True
                    flags.append(_supports(c, +1))
                    cells.append(c)
                    lines.append(
                        f"- {cond} prompts: pragmatics accuracy, `{run}` − `full-{cond}`: {_delta_cell(c)}"
                    )
                    continue
            lines.append(f"- {cond} prompts: no head-to-head comparison of `{run}` with `full-{cond}`")
        if flags:
            what = "`context` beat `full`" + ("" if legacy else " on calibrated P(correct)")
            lines.append(_verdict(flags, what, cells))
            if legacy:
                lines.append(_legacy_note("accuracy"))
        else:
            lines.append("Not tested (no head-to-head rows).")
    else:
        lines.append("Not tested (needs both `full` and `context` variants).")
    lines.append("")
    lines += _reward_spread(cfg, training or {})

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

    # 5. Factuality down in every condition: TruthfulQA's calibrated MC2 mass (MC1, MC2 beside it)
    lines.append("### 5. Factuality drops in every condition")
    flags, cells = [], []
    if _calibrated(comparison):
        fact = _rows(comparison, suite="factuality", kind="task", row="truthfulqa_mc", metric=CALIBRATED)
        if fact:
            lines.append(_measured_note("TruthfulQA (MC2's options and true answers)"))
        for r in fact:
            for run in runs:
                got = _calibrated_cell(comparison, r, run, ("mc1", "mc2"))
                if got:
                    flags.append(_supports(got[0], -1))
                    cells.append(got[0])
                    lines.append(f"- `{run}` {r['row']}: {got[1]}")
        lines.append(
            _verdict(flags, "calibrated P(true) on TruthfulQA went down", cells)
            if flags
            else "No TruthfulQA rows to test."
        )
    else:
        for metric_name in ("mc1", "mc2"):
            for r in _rows(comparison, suite="factuality", kind="task", metric=metric_name):
                for run in runs:
                    if run in r["models"]:
                        c = r["models"][run]
                        flags.append(_supports(c, -1))
                        cells.append(c)
                        lines.append(f"- `{run}` {r['row']} {metric_name}: {_delta_cell(c)}")
        if flags:
            lines += [_verdict(flags, "TruthfulQA went down", cells), _legacy_note("MC1 and MC2")]
        else:
            lines.append("No TruthfulQA rows to test.")
    lines.append("")
    for name in cfg.composed:
        lines += _claim_composed(cfg, name, runs, comparison, (composed or {}).get(name) or {})
    return lines


def _claim_composed(
    cfg: ExperimentConfig, name: str, runs: list[str], comparison: dict[str, Any], h2h: dict[str, Any]
) -> list[str]:
    """Claim 6 (beyond the paper): does the composed reward keep the pragmatics gains while factuality falls
    less? (a) its policies' pragmatics against the base model; (b) its policies against the policies of the
    variant it builds on, head to head on the same items: pragmatics (no worse) and TruthfulQA (higher).
    Decided on `p_correct_cal` (accuracy, MC1, MC2 beside it); on accuracy, MC1 and MC2 for format-1 results."""
    base = cfg.composed_base(name)
    title = f"Composed reward `{name}` = {cfg.composed[name].describe()}"
    lines = [f"### 6. {title}: pragmatics kept, factuality falling less than with `{base}`?"]
    legacy = not _calibrated(comparison)
    prag = _rows(comparison, suite="pragmatics", kind="suite", metric="acc" if legacy else CALIBRATED)
    flags, cells = [], []
    for r in prag:
        for run in runs:
            if run.startswith(f"{name}-") and run in r["models"]:
                if legacy:
                    c, text = r["models"][run], f"Δ pragmatics accuracy {_delta_cell(r['models'][run])}"
                else:
                    c, text = _calibrated_cell(comparison, r, run, ("acc",))  # type: ignore[misc]
                flags.append(_supports(c, +1))
                cells.append(c)
                lines.append(f"- `{run}` vs base: {text}")
    what = "pragmatics went up" if legacy else "calibrated P(correct) on pragmatics went up"
    lines.append("(a) " + (_verdict(flags, what, cells) if flags else "No pragmatics rows to test."))
    prag_flags, prag_cells, fact_flags, fact_cells = [], [], [], []
    h2h_legacy = False
    for cond in cfg.conditions:
        table, run = h2h.get(cond), f"{name}-{cond}"
        if not table:
            lines.append(f"- {cond} prompts: no head-to-head comparison of `{run}` with `{base}-{cond}`")
            continue
        vs = f"`{run}` − `{base}-{cond}`"
        if _calibrated(table):
            for r in _rows(table, suite="pragmatics", kind="suite", metric=CALIBRATED):
                got = _calibrated_cell(table, r, run, ("acc",))
                if got:
                    prag_flags.append(_supports(got[0], -1))  # a significant fall would lose the gains
                    prag_cells.append(got[0])
                    lines.append(f"- {cond} prompts: pragmatics, {vs}: {got[1]}")
            for r in _rows(table, suite="factuality", kind="task", row="truthfulqa_mc", metric=CALIBRATED):
                got = _calibrated_cell(table, r, run, ("mc1", "mc2"))
                if got:
                    fact_flags.append(_supports(got[0], +1))
                    fact_cells.append(got[0])
                    lines.append(f"- {cond} prompts: {r['row']}, {vs}: {got[1]}")
            continue
        h2h_legacy = True
        for r in _rows(table, suite="pragmatics", kind="suite", metric="acc"):
            if run in r["models"]:
                c = r["models"][run]
                prag_flags.append(_supports(c, -1))
                prag_cells.append(c)
                lines.append(f"- {cond} prompts: pragmatics, {vs}: {_delta_cell(c)}")
        for metric_name in ("mc1", "mc2"):
            for r in _rows(table, suite="factuality", kind="task", metric=metric_name):
                if run in r["models"]:
                    c = r["models"][run]
                    fact_flags.append(_supports(c, +1))
                    fact_cells.append(c)
                    lines.append(f"- {cond} prompts: {r['row']} {metric_name}, {vs}: {_delta_cell(c)}")
    if prag_flags:
        lost = sum(d and s for d, s in prag_flags)
        lines.append(
            f"(b) pragmatics against `{base}`: "
            + (
                f"**lower** in {lost} of {len(prag_flags)} runs (p < {ALPHA:g}): the composition cost pragmatics"
                if lost
                else f"no significant loss in {len(prag_flags)} runs{_power_suffix(prag_cells, found=False)}"
            )
        )
    else:
        lines.append(f"(b) pragmatics against `{base}`: no pragmatics suite row to compare (needs 2+ tasks).")
    what = f"TruthfulQA higher than with `{base}`" + ("" if h2h_legacy else " (calibrated P(true))")
    lines.append(
        "(c) " + (_verdict(fact_flags, what, fact_cells) if fact_flags else "No TruthfulQA rows to test.")
    )
    if legacy or h2h_legacy:
        lines.append(_legacy_note("accuracy (MC1 and MC2 for TruthfulQA)"))
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
    composed: dict[str, dict[str, Any]] | None = None,
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
            f"The multiple-choice claims (2, 3, 5, 6) decide on `{CALIBRATED}`, the probability the policy puts on "
            "the correct option(s) after calibration against each task's content-free prompt: continuous, so "
            "it sees the small shifts that flip no answer, and a change in the policy's preference for an option "
            "string regardless of the question (a label prior) cancels out of it; accuracy (MC1, MC2) is shown "
            "beside it. "
            "95 % CIs are paired bootstrap. Beside each verdict: n and the minimum detectable effect (MDE) — the "
            f"smallest true |Δ| its test would have found with {POWER * 100:g} % power (two-sided α = {ALPHA:g}); "
            "exact McNemar at the observed discordance for 0/1 scores, paired t for continuous ones, a normal "
            "approximation for a mean of task means. Not reproduced means no effect larger than the MDE, not no "
            f"effect; a run whose MDE exceeds {PLAUSIBLE_EFFECT * 100:g} points is underpowered for the claim."
        ),
        "",
        *claims(cfg, rm_metrics, comparison, head_to_head, composed, training),
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
