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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from karma.rm import data as rmdata

log = logging.getLogger(__name__)

DEFAULT_MAX_EXAMPLES = 1000
DEFAULT_MAX_PAIRS = 1000
NDCG_KS = (1, 5)
BASELINES = ("length", "bow_ridge", "earliness")


@dataclass
class EvalSet:
    """The rows every system is scored on: comments (whole threads) and pairs of one split."""

    data: Path
    split: str
    examples: Any  # DataFrame: examples.parquet columns (+ metadata)
    pairs: Any  # DataFrame: pairs.parquet columns
    pair_metadata: dict[str, dict[str, Any]]
    n_examples_available: int
    n_pairs_available: int

    @property
    def subsampled(self) -> bool:
        return len(self.examples) < self.n_examples_available or len(self.pairs) < self.n_pairs_available


@dataclass
class SystemScores:
    """One system's scores aligned with EvalSet.examples rows and EvalSet.pairs rows."""

    name: str
    examples: Any  # np.ndarray (n_examples,)
    chosen: Any  # np.ndarray (n_pairs,)
    rejected: Any  # np.ndarray (n_pairs,)


def load_eval_set(
    data: str | Path,
    split: str = "test",
    *,
    max_examples: int | None = DEFAULT_MAX_EXAMPLES,
    max_pairs: int | None = DEFAULT_MAX_PAIRS,
    seed: int = 0,
    subreddits: Sequence[str] | None = None,
    exclude_subreddits: Sequence[str] | None = None,
) -> EvalSet:
    """Read (and subsample: whole threads for comments, random pairs) one split of a prepared folder."""
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
        raise rmdata.DataError(f"{data} has no {split!r} rows" + (f" for r/{', r/'.join(subreddits)}" if subreddits
                                                                   else ""))
    ids = list(pairs["chosen_id"]) + list(pairs["rejected_id"])
    meta = rmdata.metadata_by_id(data, ids) if ids else {}
    return EvalSet(data, split, examples, pairs, meta, n_ex, n_pairs)


# ------------------------------------------------------------------------------------------- systems
def model_scores(rm, es: EvalSet, name: str = "model", batch_size: int = 32) -> SystemScores:
    """Score every distinct comment once (eval comments and pair members share ids) through RewardModel."""
    import numpy as np

    from karma.rm.model import RMInput

    inputs: dict[str, RMInput] = {}
    for r in es.examples.to_dict("records"):
        inputs[r["example_id"]] = RMInput(r["context"], r["response"], rmdata.example_metadata(r))
    for r in es.pairs[["context", "chosen", "rejected", "chosen_id", "rejected_id"]].to_dict("records"):
        for side in ("chosen", "rejected"):
            i = r[f"{side}_id"]
            if i not in inputs:
                inputs[i] = RMInput(r["context"], r[side], es.pair_metadata.get(i))
    ids = list(inputs)
    t = time.perf_counter()
    scores = dict(zip(ids, rm.score([inputs[i] for i in ids], batch_size=batch_size)))
    log.info("scored %d texts with %s in %.1fs", len(ids), name, time.perf_counter() - t)
    return SystemScores(
        name,
        np.array([scores[i] for i in es.examples["example_id"]], dtype=float),
        np.array([scores[i] for i in es.pairs["chosen_id"]], dtype=float),
        np.array([scores[i] for i in es.pairs["rejected_id"]], dtype=float),
    )


def length_scores(es: EvalSet) -> SystemScores:
    """Baseline: longer replies score higher (characters of the response)."""
    import numpy as np

    def n(texts) -> Any:
        return np.array([len(t or "") for t in texts], dtype=float)

    return SystemScores("length", n(es.examples["response"]), n(es.pairs["chosen"]), n(es.pairs["rejected"]))


def earliness_scores(es: EvalSet) -> SystemScores | None:
    """Diagnostic baseline: earlier replies score higher (−seconds since the post); None without the column.

    Not a text model: it measures how much of karma (and of the pair labels) timing alone explains, which is
    what the `full` variant can read from its metadata header.
    """
    import numpy as np

    if "seconds_since_post" not in es.examples.columns or es.examples["seconds_since_post"].isna().all():
        return None

    def neg(values) -> Any:
        v = np.asarray([np.nan if x is None else x for x in values], dtype=float)
        return -np.nan_to_num(v, nan=np.nanmax(v) if np.isfinite(v).any() else 0.0)

    def member(ids) -> list:
        return [es.pair_metadata.get(i, {}).get("seconds_since_post") for i in ids]

    return SystemScores("earliness", neg(es.examples["seconds_since_post"]), neg(member(es.pairs["chosen_id"])),
                        neg(member(es.pairs["rejected_id"])))


def bow_ridge_scores(
    es: EvalSet, *, train_subreddits: Sequence[str] | None = None, max_train: int | None = 50_000, seed: int = 0
) -> SystemScores:
    """Baseline: TF-IDF (1-2 grams) of the response → ridge regression on karma, fit on the train split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge

    train = rmdata.read_examples(es.data, "train", subreddits=train_subreddits, max_rows=max_train, seed=seed,
                                 metadata=False)
    if len(train) < 2:
        raise rmdata.DataError(f"{es.data} has too few train examples to fit the bag-of-words baseline")
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=100_000, sublinear_tf=True)
    x = vec.fit_transform(train["response"].fillna(""))
    ridge = Ridge(alpha=1.0).fit(x, train["karma"].to_numpy())

    def predict(texts) -> Any:
        return ridge.predict(vec.transform(texts.fillna("")))

    return SystemScores("bow_ridge", predict(es.examples["response"]), predict(es.pairs["chosen"]),
                        predict(es.pairs["rejected"]))


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
            sub: _subset_metrics(es, s, (es.examples["subreddit"] == sub).to_numpy(),
                                 (es.pairs["subreddit"] == sub).to_numpy())
            for sub in subs
        },
    }


# ------------------------------------------------------------------------------------------- reports
def _f(x: Any, nd: int = 3) -> str:
    return "—" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def overall_table(systems: Mapping[str, Mapping[str, Any]]) -> str:
    head = "| system | Spearman | Pearson | pairwise acc | NDCG@1 | NDCG@5 | comments | pairs |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in systems.items():
        o = m["overall"]
        lines.append(f"| {name} | {_f(o['spearman'])} | {_f(o['pearson'])} | {_f(o['pairwise_accuracy'])} | "
                     f"{_f(o['ndcg@1'])} | {_f(o['ndcg@5'])} | {o['n']} | {o['n_pairs']} |")
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
            f"{_f(systems[n]['by_subreddit'].get(sub, {}).get('pairwise_accuracy'))}" for n in names)
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


def versus_length(systems: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per reward model: does it beat the response-length baseline on pairwise accuracy?"""
    base = systems.get("length", {}).get("overall", {}).get("pairwise_accuracy")
    lines = []
    for name, m in systems.items():
        acc = m["overall"]["pairwise_accuracy"]
        if not name.startswith("rm:") or acc is None or base is None:
            continue
        verdict = "BEATS" if acc > base else "does NOT beat"
        lines.append(f"- `{name}` {verdict} the length baseline on pairwise accuracy ({acc:.3f} vs {base:.3f}).")
    return lines


def write_report(result: Mapping[str, Any], out: str | Path, title: str) -> None:
    """metrics.json + report.md + accuracy_vs_score_ratio.png for one evaluation result."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    systems = result["systems"]
    md = [
        f"# {title}", "",
        f"Split `{result['split']}` of `{result['data']}`: {result['n_examples']} comments in "
        f"{result['n_threads']} threads, {result['n_pairs']} pairs"
        + (f" (subsampled from {result['n_examples_available']} / {result['n_pairs_available']})"
           if result["subsampled"] else "") + ".", "",
        "## Overall", "", overall_table(systems), "", *versus_length(systems), "",
        "## Pairwise accuracy by score ratio", "", ratio_table(systems), "",
        "![accuracy vs score ratio](accuracy_vs_score_ratio.png)", "",
        "## Per subreddit (ρ = Spearman with karma, acc = pairwise accuracy)", "", subreddit_table(systems), "",
    ]
    (out / "report.md").write_text("\n".join(md))
    if len(result.get("systems", {})) and result["n_pairs"]:
        plot_ratio_curves(systems, out / "accuracy_vs_score_ratio.png", title)


def _eval_header(es: EvalSet) -> dict[str, Any]:
    return {
        "data": str(es.data), "split": es.split, "n_examples": len(es.examples), "n_pairs": len(es.pairs),
        "n_threads": int(es.examples["thread_id"].nunique()), "n_examples_available": es.n_examples_available,
        "n_pairs_available": es.n_pairs_available, "subsampled": es.subsampled,
        "data_card_sha256": rmdata.card_sha256(es.data),
    }


def baseline_scores(es: EvalSet, *, train_subreddits: Sequence[str] | None = None, seed: int = 0) -> list[SystemScores]:
    """length, bow_ridge and (where the data has timing metadata) earliness."""
    out = [length_scores(es), bow_ridge_scores(es, train_subreddits=train_subreddits, seed=seed)]
    early = earliness_scores(es)
    return out + [early] if early is not None else out


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
) -> dict[str, Any]:
    """Evaluate one reward model (a folder or a loaded RewardModel) on a split; write reports if `out`.

    `train_subreddits` restricts the bag-of-words baseline's training rows (use the RM's own training
    subreddits for a transfer evaluation). Returns the metrics dict that metrics.json holds.
    """
    from karma.rm.model import RewardModel, load_config

    if isinstance(model, RewardModel):
        rm, model_path = model, None
    else:
        load_config(model)  # refuses a folder without karma_rm.json before reading data
        model_path = str(model)
        rm = None
    es = load_eval_set(data, split, max_examples=max_examples, max_pairs=max_pairs, seed=seed,
                       subreddits=subreddits, exclude_subreddits=exclude_subreddits)
    if rm is None:
        rm = RewardModel.load(model_path)
    if rm.config.variant == "full":
        rmdata.check_data(data, "full", "pairwise", need_pairs=False)
    name = f"rm:{rm.config.variant}"
    scores = [model_scores(rm, es, name, batch_size=batch_size)]
    if baselines:
        scores += baseline_scores(es, train_subreddits=train_subreddits, seed=seed)
    result = {
        **_eval_header(es), "model": model_path, "variant": rm.config.variant, "objective": rm.config.objective,
        "model_version": rm.version, "subreddits": list(subreddits) if subreddits else None,
        "exclude_subreddits": list(exclude_subreddits) if exclude_subreddits else None,
        "systems": {s.name: system_metrics(es, s) for s in scores},
    }
    if out is not None:
        write_report(result, out, f"KARMA RM `{rm.config.variant}` on {split}")
    return result
