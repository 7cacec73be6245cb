"""Evaluate reward models as karma predictors: `evaluate_rm(model, data, split="test", out=DIR) -> dict`.

Systems scored on the same rows: the reward model(s), and two honest baselines — response length in
characters, and a bag-of-words (TF-IDF uni+bigram) ridge regression on the response, fit on the train split —
plus a diagnostic one where the data has timing metadata: `earliness` (earlier replies score higher), which
shows how much of karma and of the pair labels timing alone explains.

Metrics per system (see `karma.rm.metrics`):
* Spearman / Pearson of the score with normalised karma over the split's comments;
* pairwise accuracy over the split's pairs, overall and per score-ratio bucket (SHP's curve);
* NDCG@1 / NDCG@5 of each thread's comments ranked by score (gain: karma minus the thread's minimum);
* the same per subreddit.

Outputs in `out`: `metrics.json`, `report.md` (markdown tables) and `accuracy_vs_score_ratio.png`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from karma.config import Cli
from karma.rm import data as rmdata
from karma.rm import pairsets

log = logging.getLogger(__name__)

DEFAULT_MAX_EXAMPLES = 1000
DEFAULT_MAX_PAIRS = 1000
NDCG_KS = (1, 5)
BASELINES = ("length", "bow_ridge", "earliness", "lateness")


class RMEvalConfig(BaseModel):
    """Which rows a reward-model evaluation scores (`karma rm eval`, `karma rm compare`, the experiment's
    `rm_eval:`)."""

    model_config = ConfigDict(extra="forbid")

    split: str = Field("test", description="split of the prepared data to score")
    max_examples: int | None = Field(
        DEFAULT_MAX_EXAMPLES,
        ge=1,
        description="test comments to score, whole threads (null in a file, or --full-eval: all)",
    )
    max_pairs: int | None = Field(
        DEFAULT_MAX_PAIRS, ge=1, description="test pairs to score (null in a file, or --full-eval: all)"
    )
    full_eval: bool = Field(False, description="score the whole split")
    baselines: Annotated[bool, Cli("--baselines/--no-baselines")] = Field(
        True, description="also score the length and bag-of-words baselines"
    )
    subreddits: Annotated[list[str], Cli("--subreddit")] = Field(
        default_factory=list, description="evaluate on these subreddits only; repeatable"
    )
    exclude_subreddits: Annotated[list[str], Cli("--exclude-subreddit")] = Field(
        default_factory=list, description="leave these subreddits out; repeatable"
    )

    def limits(self) -> dict[str, int | None]:
        """`max_examples` / `max_pairs` as `evaluate_rm` takes them (None: the whole split)."""
        if self.full_eval:
            return {"max_examples": None, "max_pairs": None}
        return {"max_examples": self.max_examples, "max_pairs": self.max_pairs}


@dataclass
class EvalSet:
    """The rows every system is scored on: comments (whole threads), the prepared pairs of one split, and
    the evaluation pair sets built from the split's comments (`karma.rm.pairsets`)."""

    data: Path
    split: str
    examples: Any  # DataFrame: examples.parquet columns (+ metadata)
    pairs: Any  # DataFrame: pairs.parquet columns (the `rule` pair set)
    pair_metadata: dict[str, dict[str, Any]]
    n_examples_available: int
    n_pairs_available: int
    pair_sets: dict[str, Any] = field(default_factory=dict)  # set name -> pairs DataFrame
    pair_sets_available: dict[str, int] = field(default_factory=dict)

    @property
    def subsampled(self) -> bool:
        return len(self.examples) < self.n_examples_available or len(self.pairs) < self.n_pairs_available

    def inputs(self) -> dict[str, Any]:
        """Every distinct reply the systems score, by example id: {id: RMInput} (comments, then pair members)."""
        from karma.rm.model import RMInput

        out: dict[str, RMInput] = {}
        for r in self.examples.to_dict("records"):
            out[r["example_id"]] = RMInput(r["context"], r["response"], rmdata.example_metadata(r))
        for df in [self.pairs, *self.pair_sets.values()]:
            for r in df[["context", "chosen", "rejected", "chosen_id", "rejected_id"]].to_dict("records"):
                for side in ("chosen", "rejected"):
                    i = r[f"{side}_id"]
                    if i not in out:
                        out[i] = RMInput(r["context"], r[side], self.pair_metadata.get(i))
        return out


@dataclass
class SystemScores:
    """One system's scores aligned with EvalSet.examples rows, EvalSet.pairs rows and each pair set's rows."""

    name: str
    examples: Any  # np.ndarray (n_examples,)
    chosen: Any  # np.ndarray (n_pairs,)
    rejected: Any  # np.ndarray (n_pairs,)
    sets: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # set -> (chosen, rejected) arrays

    @classmethod
    def from_ids(cls, name: str, es: EvalSet, score: Mapping[str, float]) -> SystemScores:
        import numpy as np

        def arr(ids) -> Any:
            return np.array([score[i] for i in ids], dtype=float)

        return cls(
            name,
            arr(es.examples["example_id"]),
            arr(es.pairs["chosen_id"]),
            arr(es.pairs["rejected_id"]),
            {k: (arr(df["chosen_id"]), arr(df["rejected_id"])) for k, df in es.pair_sets.items()},
        )


def load_eval_set(
    data: str | Path,
    split: str = "test",
    *,
    max_examples: int | None = DEFAULT_MAX_EXAMPLES,
    max_pairs: int | None = DEFAULT_MAX_PAIRS,
    seed: int = 0,
    subreddits: Sequence[str] | None = None,
    exclude_subreddits: Sequence[str] | None = None,
    pair_sets: Sequence[str] | None = pairsets.PAIR_SETS,
    max_set_pairs: int | None = DEFAULT_MAX_PAIRS,
) -> EvalSet:
    """Read (and subsample: whole threads for comments, random pairs) one split of a prepared folder, and
    build the evaluation pair sets (`pair_sets`, each capped at `max_set_pairs`) from all its comments."""
    import pandas as pd

    data = Path(data)
    rmdata.check_data(data, "context", "pairwise", need_pairs=False)
    kw = {"subreddits": subreddits, "exclude_subreddits": exclude_subreddits}
    n_ex = len(rmdata.read_examples(data, split, metadata=False, **kw))
    examples = rmdata.read_examples(data, split, max_rows=max_examples, seed=seed, by_thread=True, **kw)
    if (data / rmdata.PAIRS).exists():
        all_pairs = rmdata.read_pairs(data, split, **kw)
        n_pairs = len(all_pairs)
        pairs = rmdata.read_pairs(data, split, max_rows=max_pairs, seed=seed, **kw)
    else:
        n_pairs, pairs = 0, pd.DataFrame(columns=list(rmdata.PAIR_COLUMNS))
    if len(examples) == 0 and len(pairs) == 0:
        raise rmdata.DataError(
            f"{data} has no {split!r} rows" + (f" for r/{', r/'.join(subreddits)}" if subreddits else "")
        )
    sets, available = {}, {}
    names = [n for n in (pair_sets or ()) if n != "rule" or len(pairs)]
    siblings = rmdata.read_sibling_rows(data, split, **kw) if set(names) - {"rule"} else None
    if siblings is not None and ("parent_id" not in siblings or "score" not in siblings):
        names = [n for n in names if n == "rule"]  # a folder without parent_id/score: only the rule pairs
    if names:
        ratio, min_score = pairsets.score_rule(data)
        full = pairsets.build_pair_sets(
            siblings,
            pairs,
            names=names,
            max_pairs=None,
            seed=seed,
            min_score_ratio=ratio,
            min_pair_score=min_score,
        )
        available = {k: (n_pairs if k == "rule" else len(v)) for k, v in full.items()}
        sets = {k: (v if k == "rule" else pairsets.cap(v, max_set_pairs, seed)) for k, v in full.items()}
        if (
            "balanced" in full and max_set_pairs and len(full["balanced"]) > max_set_pairs
        ):  # re-balance the cap
            sets["balanced"] = pairsets.build_pair_sets(
                siblings,
                pairs,
                names=["balanced"],
                max_pairs=max_set_pairs,
                seed=seed,
                min_score_ratio=ratio,
                min_pair_score=min_score,
            )["balanced"]
    ids = list(pairs["chosen_id"]) + list(pairs["rejected_id"])
    for df in sets.values():
        ids += list(df["chosen_id"]) + list(df["rejected_id"])
    meta = rmdata.metadata_by_id(data, ids) if ids else {}
    if "rule" in sets and len(pairs) and meta:
        later = [
            (meta.get(c, {}).get("created_utc") or 0) > (meta.get(r, {}).get("created_utc") or 0)
            for c, r in zip(pairs["chosen_id"], pairs["rejected_id"], strict=True)
        ]
        sets["rule"] = pairs.assign(chosen_later=later)
    return EvalSet(data, split, examples, pairs, meta, n_ex, n_pairs, sets, available)


# ------------------------------------------------------------------------------------------- systems
def model_scores(rm, es: EvalSet, name: str = "model", batch_size: int = 32) -> SystemScores:
    """Score every distinct reply once (comments, pairs and pair sets share ids) through RewardModel."""
    inputs = es.inputs()
    ids = list(inputs)
    t = time.perf_counter()
    scores = dict(
        zip(
            ids,
            rm.score([inputs[i] for i in ids], batch_size=batch_size, progress=f"scoring with {name}"),
            strict=True,
        )
    )
    log.info("scored %d texts with %s in %.1fs", len(ids), name, time.perf_counter() - t)
    return SystemScores.from_ids(name, es, scores)


def length_scores(es: EvalSet) -> SystemScores:
    """Baseline: longer replies score higher (characters of the response)."""
    return SystemScores.from_ids(
        "length", es, {i: float(len(x.response or "")) for i, x in es.inputs().items()}
    )


def _timing(es: EvalSet) -> dict[str, float] | None:
    """seconds_since_post per reply id (missing values: the latest time seen); None without the column."""
    import numpy as np

    if "seconds_since_post" not in es.examples.columns or es.examples["seconds_since_post"].isna().all():
        return None
    raw = {i: (x.metadata or {}).get("seconds_since_post") for i, x in es.inputs().items()}
    vals = np.array([np.nan if v is None else v for v in raw.values()], dtype=float)
    fill = float(np.nanmax(vals)) if np.isfinite(vals).any() else 0.0
    return {i: (fill if v is None or not np.isfinite(v) else float(v)) for i, v in raw.items()}


def earliness_scores(es: EvalSet) -> SystemScores | None:
    """Diagnostic baseline: earlier replies score higher (−seconds since the post); None without the column.

    Not a text model: it measures how much of karma (and of the pair labels) timing alone explains, which is
    what the `full` variant can read from its metadata header.
    """
    t = _timing(es)
    return None if t is None else SystemScores.from_ids("earliness", es, {i: -v for i, v in t.items()})


def lateness_scores(es: EvalSet) -> SystemScores | None:
    """Diagnostic baseline: later replies score higher (+seconds since the post) — what a model learns from
    pairs whose chosen reply is always the later one (`--pair-order later`)."""
    t = _timing(es)
    return None if t is None else SystemScores.from_ids("lateness", es, t)


def bow_ridge_scores(
    es: EvalSet,
    *,
    train_subreddits: Sequence[str] | None = None,
    max_train: int | None = 50_000,
    seed: int = 0,
) -> SystemScores:
    """Baseline: TF-IDF (1-2 grams) of the response → ridge regression on karma, fit on the train split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge

    train = rmdata.read_examples(
        es.data, "train", subreddits=train_subreddits, max_rows=max_train, seed=seed, metadata=False
    )
    if len(train) < 2:
        raise rmdata.DataError(f"{es.data} has too few train examples to fit the bag-of-words baseline")
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=100_000, sublinear_tf=True)
    x = vec.fit_transform(train["response"].fillna(""))
    ridge = Ridge(alpha=1.0).fit(x, train["karma"].to_numpy())
    inputs = es.inputs()
    pred = ridge.predict(vec.transform([x.response or "" for x in inputs.values()]))
    return SystemScores.from_ids("bow_ridge", es, dict(zip(inputs, pred.tolist(), strict=True)))


# ------------------------------------------------------------------------------------------- metrics
def _subset_metrics(es: EvalSet, s: SystemScores, ex_mask=None, pair_mask=None) -> dict[str, Any]:
    from karma.rm.metrics import correlations, ndcg_within_groups, pairwise_accuracy

    ex = es.examples if ex_mask is None else es.examples[ex_mask]
    e_scores = s.examples if ex_mask is None else s.examples[ex_mask]
    c, r = (s.chosen, s.rejected) if pair_mask is None else (s.chosen[pair_mask], s.rejected[pair_mask])
    out: dict[str, Any] = dict(correlations(e_scores, ex["karma"].to_numpy()))
    out["pairwise_accuracy"] = pairwise_accuracy(c, r)
    out["n_pairs"] = len(c)
    for k in NDCG_KS:
        nd = ndcg_within_groups(e_scores, ex["karma"].to_numpy(), ex["thread_id"].to_numpy(), k)
        out[f"ndcg@{k}"] = nd["value"]
    out["ndcg_threads"] = nd["groups"]
    return out


def system_metrics(es: EvalSet, s: SystemScores) -> dict[str, Any]:
    """All metrics of one system on an EvalSet: overall, by score-ratio bucket, per subreddit."""
    from karma.rm.metrics import accuracy_by_ratio

    subs = sorted(set(es.examples["subreddit"]) | set(es.pairs["subreddit"]))
    return {
        "overall": _subset_metrics(es, s),
        "by_score_ratio": accuracy_by_ratio(s.chosen, s.rejected, es.pairs["score_ratio"].to_numpy()),
        "by_subreddit": {
            sub: _subset_metrics(
                es, s, (es.examples["subreddit"] == sub).to_numpy(), (es.pairs["subreddit"] == sub).to_numpy()
            )
            for sub in subs
        },
    }


COMPARED_BASELINES = ("length", "bow_ridge")  # an RM is compared, paired, against each of these


def comparisons(names: Sequence[str]) -> list[tuple[str, str]]:
    """(a, b) pairs compared paired: every RM against each text baseline, and every two RMs (in order)."""
    rms = [n for n in names if n.startswith("rm:")]
    out = [(a, b) for a in rms for b in COMPARED_BASELINES if b in names]
    return out + [(a, b) for i, a in enumerate(rms) for b in rms[i + 1 :]]


def pair_set_metrics(
    es: EvalSet, scores: Sequence[SystemScores], *, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Per pair set: its make-up, every system's accuracy [95 % CI], and the paired tests of `comparisons`;
    plus every system's Spearman [95 % CI] and the paired Spearman differences over the comments."""
    from karma.rm.metrics import (
        accuracy_ci,
        bootstrap_diff,
        correlations,
        paired_wins_test,
        pairwise_wins,
        spearman_ci,
    )

    by = {s.name: s for s in scores}
    pairs_cmp = comparisons(list(by))
    out: dict[str, Any] = {"sets": {}, "spearman": {}, "spearman_paired": {}}
    for name, df in es.pair_sets.items():
        wins = {k: pairwise_wins(*s.sets[name]) for k, s in by.items()}
        out["sets"][name] = {
            **pairsets.describe(name, df),
            "available": es.pair_sets_available.get(name, len(df)),
            "systems": {k: accuracy_ci(w, n_boot, seed) for k, w in wins.items()},
            "paired": {
                f"{a} - {b}": paired_wins_test(wins[a], wins[b], n_boot, seed=seed) for a, b in pairs_cmp
            },
        }
    karma = es.examples["karma"].to_numpy(dtype=float)
    if len(karma) >= 3:
        out["spearman"] = {k: spearman_ci(s.examples, karma, n_boot, seed) for k, s in by.items()}
        out["spearman_paired"] = {
            f"{a} - {b}": bootstrap_diff(
                (by[a].examples, karma),
                (by[b].examples, karma),
                lambda p, t: correlations(p, t)["spearman"],
                n_boot,
                seed,
            )
            for a, b in pairs_cmp
        }
    return out


# ------------------------------------------------------------------------------------------- reports
def _f(x: Any, nd: int = 3) -> str:
    return "—" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def overall_table(systems: Mapping[str, Mapping[str, Any]]) -> str:
    head = "| system | Spearman | Pearson | pairwise acc | NDCG@1 | NDCG@5 | comments | pairs |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in systems.items():
        o = m["overall"]
        lines.append(
            f"| {name} | {_f(o['spearman'])} | {_f(o['pearson'])} | {_f(o['pairwise_accuracy'])} | "
            f"{_f(o['ndcg@1'])} | {_f(o['ndcg@5'])} | {o['n']} | {o['n_pairs']} |"
        )
    return "\n".join(lines)


def ratio_table(systems: Mapping[str, Mapping[str, Any]]) -> str:
    names = list(systems)
    first = next(iter(systems.values()))["by_score_ratio"]
    lines = ["| score ratio | pairs | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for i, b in enumerate(first):
        if not b["n"]:
            continue
        accs = " | ".join(_f(systems[n]["by_score_ratio"][i]["accuracy"]) for n in names)
        lines.append(f"| {b['bucket']} | {b['n']} | {accs} |")
    return "\n".join(lines)


def subreddit_table(systems: Mapping[str, Mapping[str, Any]]) -> str:
    names = list(systems)
    subs = sorted({s for m in systems.values() for s in m["by_subreddit"]})
    cols = " | ".join(f"{n} ρ | {n} acc" for n in names)
    lines = [f"| subreddit | comments | pairs | {cols} |", "|---|---:|---:|" + "---:|---:|" * len(names)]
    for sub in subs:
        any_m = next(m["by_subreddit"][sub] for m in systems.values() if sub in m["by_subreddit"])
        vals = " | ".join(
            f"{_f(systems[n]['by_subreddit'].get(sub, {}).get('spearman'))} | "
            f"{_f(systems[n]['by_subreddit'].get(sub, {}).get('pairwise_accuracy'))}"
            for n in names
        )
        lines.append(f"| r/{sub} | {any_m['n']} | {any_m['n_pairs']} | {vals} |")
    return "\n".join(lines)


def plot_ratio_curves(systems: Mapping[str, Mapping[str, Any]], path: str | Path, title: str) -> Path:
    """PNG: pairwise accuracy per score-ratio bucket, one line per system (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    buckets = next(iter(systems.values()))["by_score_ratio"]
    keep = [i for i, b in enumerate(buckets) if b["n"]]
    labels = [f"{buckets[i]['bucket']}\nn={buckets[i]['n']}" for i in keep]
    for name, m in systems.items():
        ys = [m["by_score_ratio"][i]["accuracy"] for i in keep]
        style = "--" if name in BASELINES else "-"
        ax.plot(range(len(keep)), ys, style, marker="o", label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(keep)), labels, fontsize=8)
    ax.set_xlabel("score ratio (chosen / rejected)")
    ax.set_ylabel("pairwise accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _ci(d: Mapping[str, Any] | None, key: str = "accuracy", signed: bool = False) -> str:
    if not d or d.get(key) is None:
        return "—"
    fmt = "+.3f" if signed else ".3f"
    ci = f" [{d['lo']:{fmt}}, {d['hi']:{fmt}}]" if d.get("lo") is not None else ""
    return f"{d[key]:{fmt}}{ci}"


def pair_set_table(ps: Mapping[str, Any]) -> str:
    """Systems × pair sets: accuracy [95 % CI]; a header row with each set's n and chosen-later/longer shares."""
    sets = ps["sets"]
    names = list(sets)
    if not names:
        return ""
    lines = ["| system | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---:|" * len(names)]

    def share(d: Mapping[str, Any], k: str) -> str:
        return f"{d[k]:.0%}" if d.get(k) is not None else "—"

    lines.append(
        "| *pairs (chosen later / longer)* | "
        + " | ".join(
            f"{sets[n]['n']} ({share(sets[n], 'chosen_later')} / {share(sets[n], 'chosen_longer')})"
            for n in names
        )
        + " |"
    )
    for system in next(iter(sets.values()))["systems"]:
        lines.append(f"| {system} | " + " | ".join(_ci(sets[n]["systems"].get(system)) for n in names) + " |")
    return "\n".join(lines)


def paired_table(ps: Mapping[str, Any]) -> str:
    """Paired differences per pair set: Δ accuracy [95 % CI], p, MDE (80 % power)."""
    sets = ps["sets"]
    keys = list(next(iter(sets.values()))["paired"]) if sets else []
    if not keys:
        return ""
    lines = [
        "| difference | " + " | ".join(f"`{n}`" for n in sets) + " | Δ Spearman |",
        "|---|" + "---:|" * (len(sets) + 1),
    ]
    for k in keys:
        cells = []
        for n in sets:
            d = sets[n]["paired"][k]
            cells.append(
                "—"
                if d["diff"] is None
                else f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] p={d['p']:.3g} MDE {d['mde']:.3f}"
            )
        sp = ps.get("spearman_paired", {}).get(k)
        sp_cell = (
            "—"
            if not sp or sp.get("diff") is None
            else (
                f"{sp['diff']:+.3f}"
                + (f" [{sp['lo']:+.3f}, {sp['hi']:+.3f}]" if sp.get("lo") is not None else "")
            )
        )
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {sp_cell} |")
    return "\n".join(lines)


def verdicts(ps: Mapping[str, Any], main: str = "length_controlled", also: str = "natural") -> list[str]:
    """One line per RM: does it beat each text baseline on `main` pairs (paired CI above 0), and is it not
    below the length baseline on `also` pairs?"""
    sets = ps.get("sets", {})
    if main not in sets:
        return []
    lines = []
    for k, d in sets[main]["paired"].items():
        a, b = k.split(" - ")
        if not a.startswith("rm:") or b.startswith("rm:") or d["diff"] is None:
            continue
        word = "BEATS" if d["lo"] > 0 else "is BELOW" if d["hi"] < 0 else "is not distinguishable from"
        lines.append(
            f"- `{a}` {word} `{b}` on `{main}` pairs: Δ {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] "
            f"(paired bootstrap; p = {d['p']:.3g}, n = {d['n']}, MDE {d['mde']:.3f})."
        )
        if b == "length" and also in sets:
            e = sets[also]["paired"][k]
            if e["diff"] is not None:
                word = "not below" if e["hi"] >= 0 else "BELOW"
                lines.append(
                    f"  On `{also}` pairs it is {word} `length`: Δ {e['diff']:+.3f} "
                    f"[{e['lo']:+.3f}, {e['hi']:+.3f}] (n = {e['n']})."
                )
    return lines


def versus_length(systems: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per reward model: does it beat the response-length baseline on pairwise accuracy?"""
    base = systems.get("length", {}).get("overall", {}).get("pairwise_accuracy")
    lines = []
    for name, m in systems.items():
        acc = m["overall"]["pairwise_accuracy"]
        if not name.startswith("rm:") or acc is None or base is None:
            continue
        verdict = "BEATS" if acc > base else "does NOT beat"
        lines.append(
            f"- `{name}` {verdict} the length baseline on pairwise accuracy ({acc:.3f} vs {base:.3f})."
        )
    return lines


def write_report(result: Mapping[str, Any], out: str | Path, title: str) -> None:
    """metrics.json + report.md + accuracy_vs_score_ratio.png for one evaluation result."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    systems = result["systems"]
    md = [
        f"# {title}",
        "",
        f"Split `{result['split']}` of `{result['data']}`: {result['n_examples']} comments in "
        f"{result['n_threads']} threads, {result['n_pairs']} pairs"
        + (
            f" (subsampled from {result['n_examples_available']} / {result['n_pairs_available']})"
            if result["subsampled"]
            else ""
        )
        + ".",
        "",
        "## Overall (comments; `pairwise acc` on the prepared pairs)",
        "",
        overall_table(systems),
        "",
        *versus_length(systems),
        "",
        *_pair_set_section(result.get("pair_sets") or {}),
        "## Pairwise accuracy by score ratio",
        "",
        ratio_table(systems),
        "",
        "![accuracy vs score ratio](accuracy_vs_score_ratio.png)",
        "",
        "## Per subreddit (ρ = Spearman with karma, acc = pairwise accuracy)",
        "",
        subreddit_table(systems),
        "",
    ]
    (out / "report.md").write_text("\n".join(md))
    if len(result.get("systems", {})) and result["n_pairs"]:
        plot_ratio_curves(systems, out / "accuracy_vs_score_ratio.png", title)


def _pair_set_section(ps: Mapping[str, Any]) -> list[str]:
    if not ps.get("sets"):
        return []
    legend = "; ".join(f"`{n}`: {d['description']}" for n, d in ps["sets"].items())
    return [
        "## Pair sets (pairwise accuracy [95 % bootstrap CI])",
        "",
        legend + ".",
        "",
        pair_set_table(ps),
        "",
        *verdicts(ps),
        "",
        ("### Paired differences (same pairs; p: sign-flip permutation; MDE: 80 % power, α = 0.05)"),
        "",
        paired_table(ps),
        "",
        "Spearman with karma [95 % CI]: "
        + ", ".join(f"{k} {_ci(v, 'spearman')}" for k, v in ps.get("spearman", {}).items())
        + ".",
        "",
    ]


def _eval_header(es: EvalSet) -> dict[str, Any]:
    return {
        "data": str(es.data),
        "split": es.split,
        "n_examples": len(es.examples),
        "n_pairs": len(es.pairs),
        "n_threads": int(es.examples["thread_id"].nunique()),
        "n_examples_available": es.n_examples_available,
        "n_pairs_available": es.n_pairs_available,
        "subsampled": es.subsampled,
        "data_card_sha256": rmdata.card_sha256(es.data),
    }


def baseline_scores(
    es: EvalSet, *, train_subreddits: Sequence[str] | None = None, seed: int = 0
) -> list[SystemScores]:
    """length, bow_ridge and (where the data has timing metadata) earliness and lateness."""
    out = [length_scores(es), bow_ridge_scores(es, train_subreddits=train_subreddits, seed=seed)]
    return out + [s for s in (earliness_scores(es), lateness_scores(es)) if s is not None]


def evaluate_rm(
    model,
    data: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    *,
    max_examples: int | None = DEFAULT_MAX_EXAMPLES,
    max_pairs: int | None = DEFAULT_MAX_PAIRS,
    baselines: bool = True,
    seed: int = 0,
    subreddits: Sequence[str] | None = None,
    exclude_subreddits: Sequence[str] | None = None,
    train_subreddits: Sequence[str] | None = None,
    batch_size: int = 32,
    pair_sets: Sequence[str] | None = pairsets.PAIR_SETS,
    max_set_pairs: int | None = DEFAULT_MAX_PAIRS,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Evaluate reward model(s) (a folder, a loaded RewardModel, or a list of them — scored on the same rows,
    so their differences are paired) on a split; write reports if `out`.

    `train_subreddits` restricts the bag-of-words baseline's training rows (use the RM's own training
    subreddits for a transfer evaluation). Returns the metrics dict that metrics.json holds.
    """
    from karma.rm.folder import load_config
    from karma.rm.model import RewardModel

    models = list(model) if isinstance(model, (list, tuple)) else [model]
    for m in models:
        if not isinstance(m, RewardModel):
            load_config(m)  # refuses a folder without karma_rm.json before reading data
    es = load_eval_set(
        data,
        split,
        max_examples=max_examples,
        max_pairs=max_pairs,
        seed=seed,
        subreddits=subreddits,
        exclude_subreddits=exclude_subreddits,
        pair_sets=pair_sets,
        max_set_pairs=max_set_pairs,
    )
    rms = [m if isinstance(m, RewardModel) else RewardModel.load(m) for m in models]
    paths = [None if isinstance(m, RewardModel) else str(m) for m in models]
    scores = []
    for rm in rms:
        if rm.config.variant == "full":
            rmdata.check_data(data, "full", "pairwise", need_pairs=False)
        name = f"rm:{rm.config.variant}"
        while any(s.name == name for s in scores):
            name += "'"
        scores.append(model_scores(rm, es, name, batch_size=batch_size))
    if baselines:
        scores += baseline_scores(es, train_subreddits=train_subreddits, seed=seed)
    first = rms[0]
    result = {
        **_eval_header(es),
        "model": paths[0] if len(paths) == 1 else paths,
        "variant": first.config.variant if len(rms) == 1 else [r.config.variant for r in rms],
        "objective": first.config.objective,
        "model_version": first.version if len(rms) == 1 else [r.version for r in rms],
        "subreddits": list(subreddits) if subreddits else None,
        "exclude_subreddits": list(exclude_subreddits) if exclude_subreddits else None,
        "systems": {s.name: system_metrics(es, s) for s in scores},
        "pair_sets": pair_set_metrics(es, scores, n_boot=n_boot, seed=seed),
    }
    if out is not None:
        label = ", ".join(f"`{r.config.variant}`" for r in rms)
        write_report(result, out, f"KARMA RM {label} on {split}")
    return result
