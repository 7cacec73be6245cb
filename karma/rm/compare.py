"""Train several RM variants on the same split and compare them as karma predictors: `compare_rm(...)`.

The first half of the paper's result: does `full` (context + response + metadata) predict karma better
than `context`? Every variant is trained with the same settings and scored on the same test rows; the
answer is stated from paired-bootstrap intervals of the differences, whichever way they fall.

With `train_subreddit`, every variant (and the bag-of-words baseline) is trained on that subreddit only and
evaluated twice: in-domain (its test threads) and transfer (the other subreddits' test threads).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from karma.rm import data as rmdata
from karma.rm import evaluate as ev

log = logging.getLogger(__name__)


def _verdict(b: Mapping[str, Any]) -> str:
    if b["lo"] is None:
        return "undetermined"
    return "better" if b["lo"] > 0 else "worse" if b["hi"] < 0 else "tied"


def _fmt_diff(name: str, a: float | None, b: float | None, d: Mapping[str, Any]) -> str:
    if a is None or b is None or d["diff"] is None:
        return f"{name} undefined"
    ci = f", 95% CI [{d['lo']:+.3f}, {d['hi']:+.3f}]" if d["lo"] is not None else ""
    return f"{name} {a:.3f} vs {b:.3f} (Δ {d['diff']:+.3f}{ci})"


def bootstrap_pair(es: ev.EvalSet, a: ev.SystemScores, b: ev.SystemScores, n_boot: int, seed: int) -> dict:
    """Paired bootstrap of a − b on the same rows: Spearman over comments, accuracy over pairs."""
    import numpy as np

    from karma.rm.metrics import bootstrap_diff, correlations, pairwise_wins

    karma = es.examples["karma"].to_numpy(dtype=float)
    out: dict[str, Any] = {}
    if len(karma) >= 3:
        out["spearman"] = bootstrap_diff(
            (a.examples, karma),
            (b.examples, karma),
            lambda p, t: correlations(p, t)["spearman"],
            n_boot,
            seed,
        )
    if len(es.pairs):
        out["pairwise_accuracy"] = bootstrap_diff(
            (pairwise_wins(a.chosen, a.rejected),),
            (pairwise_wins(b.chosen, b.rejected),),
            lambda w: float(np.mean(w)),
            n_boot,
            seed,
        )
    return out


def statement(
    systems: Mapping[str, Any], boots: Mapping[str, Any], a: str = "full", b: str = "context"
) -> str:
    """One sentence answering 'does `a` predict karma better than `b`?' from the numbers."""
    key = f"rm:{a} - rm:{b}"
    if key not in boots:  # a single variant (e.g. a transfer run): state it against the length baseline
        lines = []
        for name in (n for n in systems if n.startswith("rm:")):
            bs, o, base = (
                boots.get(f"{name} - length", {}),
                systems[name]["overall"],
                systems["length"]["overall"],
            )
            parts = [
                _fmt_diff(label, o[m], base[m], bs[m])
                for m, label in (("spearman", "Spearman"), ("pairwise_accuracy", "pairwise accuracy"))
                if m in bs
            ]
            lines.append(f"`{name[3:]}` vs the length baseline: {'; '.join(parts)}.")
        return f"`{a}` and `{b}` were not both trained. " + " ".join(lines)
    oa, ob = systems[f"rm:{a}"]["overall"], systems[f"rm:{b}"]["overall"]
    bs = boots[key]
    verdicts = {m: _verdict(v) for m, v in bs.items()}
    vs = set(verdicts.values())
    if vs == {"better"} or vs == {"better", "tied"}:
        answer = f"Yes: `{a}` predicts karma better than `{b}`"
    elif vs == {"worse"} or vs == {"worse", "tied"}:
        answer = f"No: `{b}` predicts karma better than `{a}`"
    elif vs == {"better", "worse"}:
        answer = f"Mixed: `{a}` and `{b}` each win on one metric"
    else:
        answer = f"Not distinguishable on this sample: `{a}` and `{b}` are within noise of each other"
    parts = []
    if "spearman" in bs:
        parts.append(_fmt_diff("Spearman", oa["spearman"], ob["spearman"], bs["spearman"]))
    if "pairwise_accuracy" in bs:
        parts.append(
            _fmt_diff(
                "pairwise accuracy", oa["pairwise_accuracy"], ob["pairwise_accuracy"], bs["pairwise_accuracy"]
            )
        )
    length_acc = systems.get("length", {}).get("overall", {}).get("pairwise_accuracy")
    tail = ""
    if length_acc is not None:
        beat = [v for v in (a, b) if (systems[f"rm:{v}"]["overall"]["pairwise_accuracy"] or 0) > length_acc]
        tail = f" The length baseline's pairwise accuracy is {length_acc:.3f}; " + (
            f"{' and '.join(f'`{v}`' for v in beat)} beat{'s' if len(beat) == 1 else ''} it."
            if beat
            else "neither beats it."
        )
    early = systems.get("earliness", {}).get("overall", {})
    if early.get("pairwise_accuracy") is not None:
        tail += (
            f" Timing alone (`earliness`) reaches pairwise accuracy {early['pairwise_accuracy']:.3f}"
            + (f" and Spearman {early['spearman']:.3f}" if early.get("spearman") is not None else "")
            + ", the part of karma that metadata can explain without reading the reply."
        )
    return f"{answer} ({'; '.join(parts)}).{tail}"


def _evaluate_set(
    es: ev.EvalSet, scores: Sequence[ev.SystemScores], n_boot: int, seed: int
) -> dict[str, Any]:
    systems = {s.name: ev.system_metrics(es, s) for s in scores}
    by_name = {s.name: s for s in scores}
    rms = [s.name for s in scores if s.name.startswith("rm:")]
    boots = {}
    for x, y in itertools.permutations(rms, 2):
        if rms.index(x) < rms.index(y):
            boots[f"{x} - {y}"] = bootstrap_pair(es, by_name[x], by_name[y], n_boot, seed)
    for x in rms:
        boots[f"{x} - length"] = bootstrap_pair(es, by_name[x], by_name["length"], n_boot, seed)
    return {
        **ev._eval_header(es),
        "systems": systems,
        "bootstrap": boots,
        "pair_sets": ev.pair_set_metrics(es, scores, n_boot=n_boot, seed=seed),
        "statement": statement(systems, boots),
    }


def _bootstrap_table(boots: Mapping[str, Any]) -> str:
    lines = ["| difference | Δ Spearman [95% CI] | Δ pairwise acc [95% CI] |", "|---|---:|---:|"]

    def cell(d):
        if d is None or d["diff"] is None:
            return "—"
        return (
            f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
            if d["lo"] is not None
            else f"{d['diff']:+.3f}"
        )

    for k, v in boots.items():
        lines.append(f"| {k} | {cell(v.get('spearman'))} | {cell(v.get('pairwise_accuracy'))} |")
    return "\n".join(lines)


def compare_rm(
    data: str | Path,
    out: str | Path,
    variants: Sequence[str] = ("full", "context", "response"),
    *,
    split: str = "test",
    train_subreddit: str | None = None,
    max_examples: int | None = ev.DEFAULT_MAX_EXAMPLES,
    max_pairs: int | None = ev.DEFAULT_MAX_PAIRS,
    n_boot: int = 500,
    eval_seed: int = 0,
    **train_overrides: Any,
) -> dict[str, Any]:
    """Train each variant (same data, settings, seed) into out/rm_<variant>, evaluate all on the same rows.

    Writes out/compare.json, out/compare.md and out/accuracy_vs_score_ratio*.png; returns the dict.
    """
    from karma.models import resolve_backbone
    from karma.rm.model import RewardModel
    from karma.rm.train import RMTrainConfig, train_rm

    data, out = Path(data), Path(out)
    t0 = time.perf_counter()
    cfg = RMTrainConfig(**train_overrides)
    if not variants:
        raise ValueError("no variants to compare")
    resolve_backbone(cfg.backbone)
    for v in variants:  # every variant's data needs checked before the first one trains
        rmdata.check_data(data, v, cfg.objective)
    subs = [train_subreddit] if train_subreddit else None
    kw = {"max_examples": max_examples, "max_pairs": max_pairs, "seed": eval_seed}
    if train_subreddit:
        sets = {
            "in_domain": ev.load_eval_set(data, split, subreddits=subs, **kw),
            "transfer": ev.load_eval_set(data, split, exclude_subreddits=subs, **kw),
        }
    else:
        sets = {"test": ev.load_eval_set(data, split, **kw)}
    scores: dict[str, list[ev.SystemScores]] = {
        k: ev.baseline_scores(es, train_subreddits=subs, seed=eval_seed) for k, es in sets.items()
    }
    trained = {}
    for v in variants:
        path = train_rm(data, out / f"rm_{v}", cfg, variant=v, train_subreddits=subs)
        rm = RewardModel.load(path)
        trained[v] = {
            "path": str(path),
            "val": rm.config.metrics.get("val"),
            "train": rm.config.metrics.get("train"),
        }
        for k, es in sets.items():
            n_rm = sum(s.name.startswith("rm:") for s in scores[k])
            scores[k].insert(n_rm, ev.model_scores(rm, es, f"rm:{v}"))
    results = {k: _evaluate_set(es, scores[k], n_boot, eval_seed) for k, es in sets.items()}
    result = {
        "data": str(data),
        "split": split,
        "variants": list(variants),
        "train_subreddit": train_subreddit,
        "objective": cfg.objective,
        "backbone": cfg.backbone,
        "training": {k: v for k, v in vars(cfg).items()},
        "models": trained,
        "evaluations": results,
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=2, default=str))
    md = [
        f"# KARMA RM variants compared ({cfg.objective}, backbone {cfg.backbone})",
        "",
        f"Data `{data}`; each variant trained on {next(iter(trained.values()))['train']['items']} train "
        f"{next(iter(trained.values()))['train']['item_kind']}"
        + (f" from r/{train_subreddit} only" if train_subreddit else "")
        + f"; {result['elapsed_s']:.0f} s in all.",
        "",
    ]
    for k, r in results.items():
        title = {
            "test": f"Split `{split}`",
            "in_domain": f"In-domain: r/{train_subreddit} `{split}`",
            "transfer": f"Transfer: other subreddits' `{split}`",
        }[k]
        png = "accuracy_vs_score_ratio.png" if k == "test" else f"accuracy_vs_score_ratio_{k}.png"
        if r["n_pairs"]:
            ev.plot_ratio_curves(r["systems"], out / png, f"{title} — pairwise accuracy by score ratio")
        md += [
            f"## {title}",
            "",
            f"{r['n_examples']} comments in {r['n_threads']} threads, {r['n_pairs']} pairs"
            + (
                f" (subsampled from {r['n_examples_available']} / {r['n_pairs_available']})"
                if r["subsampled"]
                else ""
            )
            + ".",
            "",
            f"**{r['statement']}**",
            "",
            ev.overall_table(r["systems"]),
            "",
            "Paired bootstrap of the differences (same rows resampled):",
            "",
            _bootstrap_table(r["bootstrap"]),
            "",
            *ev._pair_set_section(r["pair_sets"]),
            ev.ratio_table(r["systems"]),
            "",
            f"![accuracy vs score ratio]({png})",
            "",
            "Per subreddit (ρ = Spearman, acc = pairwise accuracy):",
            "",
            ev.subreddit_table(r["systems"]),
            "",
        ]
    (out / "compare.md").write_text("\n".join(md))
    return result


def _mde_from_ci(d: Mapping[str, Any]) -> float | None:
    """MDE at 80 % power, α = 0.05, from a bootstrap 95 % interval (its half-width / 1.96 as the standard error)."""
    from karma.rm.metrics import Z_ALPHA, Z_POWER

    if d.get("lo") is None or d.get("hi") is None:
        return None
    return (Z_ALPHA + Z_POWER) * (d["hi"] - d["lo"]) / (2 * Z_ALPHA)


def karma_prediction_claim(
    result: Mapping[str, Any], a: str = "rm:full", b: str = "rm:context", alpha: float = 0.05
) -> list[str]:
    """Claim 1 of the paper ("`a` predicts karma better than `b`") from one `evaluate_rm([a, b], ...)` result:
    a table of every system with 95 % CIs, then the verdict from the *paired* tests on the same rows —
    Spearman over comments (paired bootstrap CI) and pairwise accuracy on the `natural` pairs (sign-flip p) —
    with n and the minimum detectable effect of each."""
    ps = result.get("pair_sets") or {}
    sets = ps.get("sets", {})
    spear = ps.get("spearman", {})
    shown = [s for s in ("natural", "length_controlled", "close_in_time", "rule") if s in sets]
    head = "| system | Spearman [95 % CI] | " + " | ".join(f"acc `{s}` [95 % CI]" for s in shown) + " |"
    lines = [head, "|---|" + "---:|" * (1 + len(shown))]
    for name in result.get("systems", {}):
        cells = [ev._ci(spear.get(name), "spearman")] + [ev._ci(sets[s]["systems"].get(name)) for s in shown]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Comments: {result.get('n_examples')}; pairs: "
        + ", ".join(f"`{s}` {sets[s]['n']} ({sets[s]['description']})" for s in shown)
        + ".",
        "",
    ]
    lines += ev.verdicts(ps)
    key = f"{a} - {b}"
    sp = ps.get("spearman_paired", {}).get(key)
    acc = sets.get("natural", {}).get("paired", {}).get(key)
    if not sp or sp.get("diff") is None:
        return lines + ["", f"Not tested: `{a[3:]}` and `{b[3:]}` were not both evaluated on the same rows."]
    sp_mde = _mde_from_ci(sp)
    sp_sig = sp["lo"] > 0 or sp["hi"] < 0
    parts = [
        (
            f"paired Δ Spearman ({a[3:]} − {b[3:]}) {sp['diff']:+.3f} [{sp['lo']:+.3f}, {sp['hi']:+.3f}] "
            f"(n = {result.get('n_examples')} comments, MDE {sp_mde:.3f})"
        )
    ]
    if acc and acc.get("diff") is not None:
        parts.append(
            f"paired Δ accuracy on `natural` pairs {acc['diff']:+.3f} [{acc['lo']:+.3f}, {acc['hi']:+.3f}] "
            f"(p = {acc['p']:.3g}, n = {acc['n']}, MDE {acc['mde']:.3f})"
        )
    if sp_sig and sp["diff"] > 0:
        verdict = f"**Reproduced**: `{a[3:]}` predicts karma better than `{b[3:]}`"
    elif sp_sig:
        verdict = f"**Not reproduced (reversed)**: `{b[3:]}` predicts karma better than `{a[3:]}`"
    else:
        verdict = (
            f"**Not reproduced at this scale**: no Spearman difference larger than {sp_mde:.3f} "
            f"(MDE at 80 % power) between `{a[3:]}` and `{b[3:]}`"
        )
    return lines + ["", verdict + " — " + "; ".join(parts) + "."]
