"""Karma-prediction metrics, `evaluate_rm`, `compare_rm` and the `karma rm` commands (fast, tiny models)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr
from typer.testing import CliRunner

from karma.rm import metrics
from karma.rm.cli import app
from karma.rm.compare import compare_rm, statement
from karma.rm.evaluate import evaluate_rm
from karma.rm.model import MissingRMConfigError
from karma.rm.train import train_rm
from tests.support import tiny_backbone, write_prepared_data

FAST = {"learning_rate": 3e-3, "batch_size": 16, "logging_steps": 5, "threads": 1, "progress": False}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return str(tiny_backbone(tmp_path_factory.mktemp("bb") / "tiny-bert"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_prepared_data(tmp_path_factory.mktemp("data") / "prepared", n_threads=80)


@pytest.fixture(scope="module")
def rm_dir(backbone, data, tmp_path_factory):
    return train_rm(
        data, tmp_path_factory.mktemp("rm") / "ctx", backbone=backbone, max_steps=40, eval_steps=20, **FAST
    )


# ------------------------------------------------------------------------------------------- metrics
def test_pairwise_accuracy_counts_ties_as_half():
    assert metrics.pairwise_accuracy([3, 1, 2, 5], [1, 2, 2, 4]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert metrics.pairwise_accuracy([], []) is None


def test_accuracy_by_ratio_buckets():
    b = metrics.accuracy_by_ratio([1, 1, 0, 1, 1], [0, 0, 1, 0, 2], [2.0, 2.5, 2.9, 4.0, 50.0])
    by = {x["bucket"]: x for x in b}
    assert by["[2,3)"]["n"] == 3 and by["[2,3)"]["accuracy"] == pytest.approx(2 / 3)
    assert by["[3,5)"]["n"] == 1 and by["[3,5)"]["accuracy"] == 1.0
    assert by[">=10"]["n"] == 1 and by[">=10"]["accuracy"] == 0.0
    assert by["[1,1.5)"]["n"] == 0 and by["[1,1.5)"]["accuracy"] is None


def test_ndcg_within_groups():
    karma = [3.0, 1.0, 0.0, 2.0, 0.0, 5.0]
    groups = ["a", "a", "a", "b", "b", "c"]  # c has one item: skipped
    perfect = metrics.ndcg_within_groups(karma, karma, groups, k=5)
    assert perfect == {"value": pytest.approx(1.0), "groups": 2}
    worst = metrics.ndcg_within_groups([-k for k in karma], karma, groups, k=1)
    assert worst["value"] == pytest.approx(0.0)  # the top-ranked item has gain 0 in both groups


def test_correlations_and_undefined_values():
    c = metrics.correlations([1, 2, 3, 4], [10, 20, 30, 41])
    assert c["spearman"] == pytest.approx(1.0) and 0.99 < c["pearson"] < 1.0 and c["n"] == 4
    assert metrics.correlations([1, 1, 1], [1, 2, 3]) == {"spearman": None, "pearson": None, "n": 3}


def test_bootstrap_difference_interval():
    rng = np.random.default_rng(0)
    a = (rng.random(400) < 0.7).astype(float)
    b = (rng.random(400) < 0.5).astype(float)
    d = metrics.bootstrap_diff((a,), (b,), lambda w: float(w.mean()), n_boot=300)
    assert d["diff"] == pytest.approx(a.mean() - b.mean())
    assert d["lo"] < d["diff"] < d["hi"] and d["lo"] > 0


# ------------------------------------------------------------------------------------------- evaluate_rm
def test_evaluate_rm_writes_reports_and_baselines_match_hand_computation(rm_dir, data, tmp_path):
    r = evaluate_rm(rm_dir, data, "test", tmp_path / "ev", max_examples=None, max_pairs=None)
    ex = pd.read_parquet(data / "examples.parquet")
    ex = ex[ex["split"] == "test"]
    pairs = pd.read_parquet(data / "pairs.parquet")
    pairs = pairs[pairs["split"] == "test"]
    assert r["n_examples"] == len(ex) and r["n_pairs"] == len(pairs) and not r["subsampled"]
    assert set(r["systems"]) == {"rm:context", "length", "bow_ridge", "earliness", "lateness"}

    length = r["systems"]["length"]["overall"]
    assert length["spearman"] == pytest.approx(spearmanr(ex["response"].str.len(), ex["karma"]).statistic)
    c, j = pairs["chosen"].str.len().to_numpy(), pairs["rejected"].str.len().to_numpy()
    assert length["pairwise_accuracy"] == pytest.approx(((c > j) + 0.5 * (c == j)).mean())

    # earliness: −seconds_since_post of each pair member, joined by id
    since = ex.set_index("example_id")["seconds_since_post"]
    c, j = since[pairs["chosen_id"]].to_numpy(), since[pairs["rejected_id"]].to_numpy()
    assert r["systems"]["earliness"]["overall"]["pairwise_accuracy"] == pytest.approx(
        ((c < j) + 0.5 * (c == j)).mean()
    )
    assert r["systems"]["earliness"]["overall"]["spearman"] == pytest.approx(
        spearmanr(-ex["seconds_since_post"], ex["karma"]).statistic
    )

    for name, m in r["systems"].items():
        o = m["overall"]
        assert -1 <= o["spearman"] <= 1 and -1 <= o["pearson"] <= 1, name
        assert 0 <= o["pairwise_accuracy"] <= 1 and 0 < o["ndcg@5"] <= 1, name
        assert sum(b["n"] for b in m["by_score_ratio"]) == len(pairs)
        assert set(m["by_subreddit"]) == {"College", "ApplyingToCollege"}
        assert sum(s["n"] for s in m["by_subreddit"].values()) == len(ex)

    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["systems"]["rm:context"]["overall"] == r["systems"]["rm:context"]["overall"]
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "| rm:context |" in report and "| r/College |" in report
    assert "the length baseline on pairwise accuracy" in report
    assert (tmp_path / "ev" / "accuracy_vs_score_ratio.png").read_bytes()[:8] == PNG_MAGIC


def test_pair_sets_are_built_from_the_split_in_both_orders(rm_dir, data, tmp_path):
    from karma.rm.pairsets import LENGTH_RATIO

    r = evaluate_rm(
        rm_dir, data, "test", tmp_path / "ev", max_examples=None, max_pairs=None, max_set_pairs=None
    )
    ex = pd.read_parquet(data / "examples.parquet")
    ex = ex[(ex["split"] == "test") & (ex["score"] >= 2)]
    m = ex.merge(ex, on="parent_id", suffixes=("_a", "_b"))
    m = m[(m["score_a"] > m["score_b"]) & (m["score_a"] >= 2 * m["score_b"])]
    la, lb = m["response_a"].str.len(), m["response_b"].str.len()
    sets = r["pair_sets"]["sets"]
    assert sets["natural"]["n"] == len(m) > 0
    assert sets["natural"]["chosen_later"] == pytest.approx((m["created_utc_a"] > m["created_utc_b"]).mean())
    # the prepared (rule) pairs have the chosen reply never earlier; the natural ones have both orders
    assert 0 < sets["natural"]["chosen_later"] < 1 and sets["balanced"]["chosen_later"] == pytest.approx(0.5)
    ctl = (la.clip(lower=lb) / lb.clip(upper=la).clip(lower=1)) <= LENGTH_RATIO
    assert sets["length_controlled"]["n"] == int(ctl.sum())
    wins = ((la > lb) + 0.5 * (la == lb))[ctl]
    assert sets["length_controlled"]["systems"]["length"]["accuracy"] == pytest.approx(wins.mean())
    late = sets["natural"]["systems"]["lateness"]["accuracy"]
    assert late == pytest.approx(1 - sets["natural"]["systems"]["earliness"]["accuracy"])
    for name, d in sets.items():
        for system, a in d["systems"].items():
            assert a["lo"] <= a["accuracy"] <= a["hi"], (name, system)
        p = d["paired"]["rm:context - length"]
        assert p["diff"] == pytest.approx(
            d["systems"]["rm:context"]["accuracy"] - d["systems"]["length"]["accuracy"]
        )
        assert 0 < p["p"] <= 1 and p["mde"] > 0
    report = (tmp_path / "ev" / "report.md").read_text()
    assert (
        "## Pair sets" in report
        and "`length_controlled`" in report
        and "on `length_controlled` pairs" in report
    )


def test_capped_balanced_set_stays_half_chosen_later(rm_dir, data, tmp_path):
    full = evaluate_rm(
        rm_dir, data, "test", tmp_path / "full", max_examples=None, max_pairs=None, max_set_pairs=None
    )
    n = full["pair_sets"]["sets"]["balanced"]["n"]
    assert n >= 6
    cap = n // 2 - (n // 2) % 2  # an even cap below the full balanced set
    r = evaluate_rm(
        rm_dir, data, "test", tmp_path / "ev", max_examples=None, max_pairs=None, max_set_pairs=cap
    )
    d = r["pair_sets"]["sets"]["balanced"]
    assert d["n"] == cap and d["chosen_later"] == 0.5 and d["available"] == n


def test_paired_wins_test_interval_p_and_mde():
    rng = np.random.default_rng(1)
    a = (rng.random(2000) < 0.62).astype(float)
    b = (rng.random(2000) < 0.50).astype(float)
    t = metrics.paired_wins_test(a, b, n_boot=500, n_perm=999, seed=0)
    assert t["diff"] == pytest.approx(a.mean() - b.mean()) and t["lo"] < t["diff"] < t["hi"] and t["lo"] > 0
    assert t["p"] == pytest.approx(1 / 1000)  # no sign flip reaches a 12-point difference at n = 2000
    assert t["mde"] == pytest.approx(2.8015852 * np.std(a - b, ddof=1) / np.sqrt(2000), rel=1e-6)
    same = metrics.paired_wins_test(a, a, n_boot=100, n_perm=99)
    assert same["diff"] == 0 and same["p"] == 1.0 and same["discordant"] == 0


def test_evaluate_two_models_on_the_same_rows_gives_paired_differences(rm_dir, data):
    r = evaluate_rm([rm_dir, rm_dir], data, "test", baselines=False, n_boot=100)
    assert list(r["systems"]) == ["rm:context", "rm:context'"]
    d = r["pair_sets"]["sets"]["natural"]["paired"]["rm:context - rm:context'"]
    assert d["diff"] == 0 and d["lo"] == 0 and d["hi"] == 0


def test_claim_one_is_decided_by_the_paired_tests(rm_dir, data):
    from karma.rm.compare import karma_prediction_claim

    r = evaluate_rm([rm_dir, rm_dir], data, "test", n_boot=200)
    text = "\n".join(karma_prediction_claim(r, a="rm:context", b="rm:context'"))
    # the same model twice: a zero paired difference, stated with the effect the run could have detected
    assert (
        "**Not reproduced at this scale**: no Spearman difference larger than 0.000 (MDE at 80 % power)"
        in text
    )
    assert "paired Δ Spearman (context − context') +0.000 [+0.000, +0.000]" in text
    assert "paired Δ accuracy on `natural` pairs +0.000" in text
    assert "| length |" in text and "acc `length_controlled` [95 % CI]" in text
    assert "on `length_controlled` pairs: Δ" in text  # each RM against each text baseline, paired
    missing = karma_prediction_claim(evaluate_rm(rm_dir, data, "test", n_boot=50))
    assert missing[-1] == "Not tested: `full` and `context` were not both evaluated on the same rows."


def test_evaluate_rm_model_scores_equal_reward_model_scores(rm_dir, data):
    from karma.rm.data import example_inputs, read_examples
    from karma.rm.model import RewardModel

    # float64: evaluate_rm scores every distinct reply of comments and pairs, here only the comments -- other
    # batches. In float32 two near-equal scores could then swap ranks (Spearman moves by up to ~12/n^2, over the
    # default rel 1e-6); in float64 the scorings differ by ~1e-16 relative, below any gap between two replies.
    rm = RewardModel.load(rm_dir, dtype="float64")
    r = evaluate_rm(rm, data, "test", baselines=False, max_examples=None, max_pairs=None)
    ex = read_examples(data, "test")
    s = rm.score(example_inputs(ex))
    assert r["systems"]["rm:context"]["overall"]["spearman"] == pytest.approx(
        spearmanr(s, ex["karma"]).statistic
    )


def test_evaluate_rm_subsamples_whole_threads_and_filters_subreddits(rm_dir, data):
    r = evaluate_rm(
        rm_dir, data, "test", baselines=False, max_examples=20, max_pairs=5, subreddits=["College"]
    )
    assert r["subsampled"] and r["n_pairs"] == 5 and 0 < r["n_examples"] <= 20
    assert r["n_examples"] % 6 == 0  # 6 comments per synthetic thread: only whole threads are taken
    assert set(r["systems"]["rm:context"]["by_subreddit"]) == {"College"}


def test_no_earliness_baseline_without_timing_metadata(rm_dir, tmp_path):
    d = write_prepared_data(tmp_path / "nometa", n_threads=20, metadata=False)
    r = evaluate_rm(rm_dir, d, "test")
    assert set(r["systems"]) == {"rm:context", "length", "bow_ridge"}


def test_evaluate_refuses_folder_without_karma_rm_json(backbone, data):
    with pytest.raises(MissingRMConfigError, match="karma_rm.json is missing"):
        evaluate_rm(backbone, data)


# ------------------------------------------------------------------------------------------- compare
def test_compare_trains_each_variant_and_states_the_answer(backbone, data, tmp_path):
    r = compare_rm(
        data,
        tmp_path / "cmp",
        ["full", "context"],
        backbone=backbone,
        max_steps=20,
        eval_steps=20,
        n_boot=100,
        **FAST,
    )
    ev = r["evaluations"]["test"]
    assert list(ev["systems"]) == ["rm:full", "rm:context", "length", "bow_ridge", "earliness", "lateness"]
    paired = ev["pair_sets"]["sets"]["natural"]["paired"]["rm:full - rm:context"]
    accs = ev["pair_sets"]["sets"]["natural"]["systems"]
    assert paired["diff"] == pytest.approx(accs["rm:full"]["accuracy"] - accs["rm:context"]["accuracy"])
    assert "Paired differences" in (tmp_path / "cmp" / "compare.md").read_text()
    b = ev["bootstrap"]["rm:full - rm:context"]
    full, ctx = ev["systems"]["rm:full"]["overall"], ev["systems"]["rm:context"]["overall"]
    assert b["spearman"]["diff"] == pytest.approx(full["spearman"] - ctx["spearman"])
    assert b["pairwise_accuracy"]["diff"] == pytest.approx(
        full["pairwise_accuracy"] - ctx["pairwise_accuracy"]
    )
    assert f"Spearman {full['spearman']:.3f} vs {ctx['spearman']:.3f}" in ev["statement"]
    early = ev["systems"]["earliness"]["overall"]["pairwise_accuracy"]
    assert f"Timing alone (`earliness`) reaches pairwise accuracy {early:.3f}" in ev["statement"]
    assert ev["statement"].split(":")[0] in ("Yes", "No", "Mixed", "Not distinguishable on this sample")
    assert (tmp_path / "cmp" / "rm_full" / "karma_rm.json").exists()
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert ev["statement"] in md and "| rm:full |" in md
    assert (tmp_path / "cmp" / "accuracy_vs_score_ratio.png").read_bytes()[:8] == PNG_MAGIC


def test_statement_follows_the_intervals():
    systems = {
        "rm:full": {"overall": {"spearman": 0.4, "pairwise_accuracy": 0.7}},
        "rm:context": {"overall": {"spearman": 0.3, "pairwise_accuracy": 0.6}},
        "length": {"overall": {"pairwise_accuracy": 0.65}},
    }
    better = {
        "rm:full - rm:context": {
            "spearman": {"diff": 0.1, "lo": 0.05, "hi": 0.15},
            "pairwise_accuracy": {"diff": 0.1, "lo": -0.01, "hi": 0.2},
        }
    }
    s = statement(systems, better)
    assert s.startswith("Yes: `full` predicts karma better than `context`")
    assert "Δ +0.100, 95% CI [+0.050, +0.150]" in s and "`full` beats it" in s
    worse = {
        "rm:full - rm:context": {
            "spearman": {"diff": 0.1, "lo": -0.2, "hi": -0.01},
            "pairwise_accuracy": {"diff": 0.1, "lo": -0.2, "hi": 0.3},
        }
    }
    assert statement(systems, worse).startswith("No: `context` predicts karma better than `full`")
    tied = {"rm:full - rm:context": {"spearman": {"diff": 0.1, "lo": -0.2, "hi": 0.3}}}
    assert statement(systems, tied).startswith("Not distinguishable")
    systems["length"]["overall"]["spearman"] = 0.2
    single = {
        "rm:context - length": {
            "spearman": {"diff": 0.1, "lo": 0.02, "hi": 0.2},
            "pairwise_accuracy": {"diff": -0.05, "lo": -0.1, "hi": 0.01},
        }
    }
    del systems["rm:full"]
    assert statement(systems, single) == (
        "`full` and `context` were not both trained. `context` vs the length baseline: Spearman 0.300 vs 0.200 "
        "(Δ +0.100, 95% CI [+0.020, +0.200]); pairwise accuracy 0.600 vs 0.650 (Δ -0.050, 95% CI [-0.100, +0.010])."
    )


def test_compare_transfer_evaluates_in_domain_and_other_subreddits(backbone, data, tmp_path):
    r = compare_rm(
        data,
        tmp_path / "tr",
        ["context"],
        backbone=backbone,
        train_subreddit="College",
        max_steps=5,
        eval_steps=5,
        n_boot=50,
        **FAST,
    )
    assert set(r["evaluations"]) == {"in_domain", "transfer"}
    assert set(r["evaluations"]["in_domain"]["systems"]["rm:context"]["by_subreddit"]) == {"College"}
    assert set(r["evaluations"]["transfer"]["systems"]["rm:context"]["by_subreddit"]) == {"ApplyingToCollege"}
    cfg = json.loads((tmp_path / "tr" / "rm_context" / "karma_rm.json").read_text())
    assert cfg["training"]["train_subreddits"] == ["College"]


# ------------------------------------------------------------------------------------------- CLI
def test_cli_train_eval_and_errors(backbone, data, tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "m"),
            "--backbone",
            backbone,
            "--max-steps",
            "4",
            "--max-train",
            "30",
            "--threads",
            "1",
            "--lr",
            "1e-3",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "SUBSAMPLED: pass --full for the full run" in res.output and "on 30 of" in res.output
    res = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tmp_path / "m"),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "e"),
            "--max-pairs",
            "10",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "| rm:context |" in res.output and (tmp_path / "e" / "report.md").exists()
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["n_pairs"] == 10 and all(math.isfinite(v["overall"]["spearman"]) for v in m["systems"].values())

    nometa = write_prepared_data(tmp_path / "nometa", n_threads=10, metadata=False)
    res = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(nometa),
            "--out",
            str(tmp_path / "x"),
            "--variant",
            "full",
            "--backbone",
            backbone,
        ],
    )
    assert res.exit_code == 2 and "variant 'full' needs metadata columns" in res.output
    res = runner.invoke(
        app, ["train", "--data", str(data), "--out", str(tmp_path / "x"), "--backbone", "./nope/x"]
    )
    assert res.exit_code == 2 and "model path does not exist" in res.output
    res = runner.invoke(app, ["eval", "--model", backbone, "--data", str(data), "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "karma_rm.json is missing" in res.output
