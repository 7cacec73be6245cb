"""`karma experiment` / `karma demo`: config validation, --data discovery, claim verdicts, and (slow) the
whole pipeline end to end at a tiny size with a real reward-service process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from karma.eval import power as P
from karma.experiment import (
    PLAUSIBLE_EFFECT,
    POWER,
    ExperimentConfig,
    claims,
    data_spec_from_path,
    training_summary,
    write_report,
)
from karma.paths import shared_data_dir

SHARED = shared_data_dir()


def test_presets_load_and_validate():
    for preset in ("quick", "cpu", "default", "demo"):
        cfg = ExperimentConfig.load(preset)
        assert cfg.variants and cfg.conditions
    assert ExperimentConfig.load("quick").smoke and not ExperimentConfig.load("cpu").smoke
    assert ExperimentConfig.load("quick").variants == ["full", "context"]
    assert ExperimentConfig.load("quick", {"train.run.steps": 2}).train.run.steps == 2


def test_bad_configs_fail_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match=r"rm.variants.0\n  Input should be 'full', 'context' or 'response'"):
        ExperimentConfig(data={"comments": ["x"]}, rm={"variants": ["karma"]}, conditions={"r": "reddit"})
    with pytest.raises(ValueError, match="prompt source must be 'reddit', 'politeness' or 'file:PATH'"):
        ExperimentConfig(data={"comments": ["x"]}, conditions={"r": "twitter"})
    with pytest.raises(ValueError, match="data\n  Field required"):
        ExperimentConfig(conditions={"r": "reddit"})
    bad = tmp_path / "x.yaml"
    bad.write_text("name: x\nsteps: 3\n")
    with pytest.raises(
        ValueError,
        match=f"{bad}: invalid config:\n  data: Field required\n  conditions: Field required\n  steps: unknown key",
    ):
        ExperimentConfig.load(str(bad))
    with pytest.raises(FileNotFoundError, match="experiment config not found"):
        ExperimentConfig.load(str(tmp_path / "missing.yaml"))
    # every section is its stage's own type: a wrong key or value deep inside fails at load, named
    quick = "preset quick: invalid config:\n  "
    for override, message in [
        ({"train.ppo.kl_coeff": 0.1}, "train.ppo.kl_coeff: unknown key"),
        ({"train.ppo.algo": "dpo"}, "train.ppo.algo: Input should be 'ppo', 'rloo' or 'grpo'"),
        ({"rm.max_lenght": 64}, "rm.max_lenght: unknown key"),
        ({"rm_eval.max_pairs": 0}, "rm_eval.max_pairs: Input should be greater than or equal to 1"),
        ({"eval.suite": "pragmatics"}, "eval.suite: unknown key"),
        ({"data.normalise": "log1p"}, "data.dumps.normalise: unknown key"),
        (
            {"serve": {"max_wait": 3}},
            "serve: unknown `karma serve` setting\\(s\\) max_wait; expected admin_token",
        ),
    ]:
        with pytest.raises(ValueError, match=quick + message):
            ExperimentConfig.load("quick", override)


def test_experiment_flags_and_environment(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from karma.cli import app

    monkeypatch.setenv("KARMA_EXPERIMENT_SEED", "7")
    res = CliRunner().invoke(app, ["experiment", "--quick", "--out", str(tmp_path / "o"), "--print-config"])
    assert res.exit_code == 0, res.output
    cfg = __import__("yaml").safe_load(res.output)
    assert (cfg["name"], cfg["seed"], cfg["out"], cfg["train"]["run"]["steps"]) == (
        "quick",
        7,
        str(tmp_path / "o"),
        6,
    )
    res = CliRunner().invoke(app, ["experiment", "-c", "cpu", "--seed", "3", "--print-config"])
    assert res.exit_code == 0 and __import__("yaml").safe_load(res.output)["seed"] == 3


def test_data_spec_from_path(tmp_path):
    (tmp_path / "RC_2020-01.zst").write_bytes(b"")
    (tmp_path / "RS_2020-01.zst").write_bytes(b"")
    (tmp_path / "shp_rows.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("")
    spec = data_spec_from_path(tmp_path)
    assert spec == {
        "comments": [str(tmp_path / "RC_2020-01.zst")],
        "submissions": [str(tmp_path / "RS_2020-01.zst")],
        "shp": [str(tmp_path / "shp_rows.jsonl")],
    }
    prepared = tmp_path / "prep"
    prepared.mkdir()
    (prepared / "card.json").write_text("{}")
    (prepared / "examples.parquet").write_bytes(b"")
    assert data_spec_from_path(prepared) == {"prepared": str(prepared)}
    with pytest.raises(FileNotFoundError, match="--data path does not exist"):
        data_spec_from_path(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no Pushshift dumps"):
        data_spec_from_path(empty)


def _cmp_row(suite, row, kind, metric, deltas, p=0.01, **extra):
    return {
        "suite": suite,
        "row": row,
        "kind": kind,
        "metric": metric,
        "models": {
            run: {"delta": d, "ci_low": d - 0.1, "ci_high": d + 0.1, "p": p, "n": 40, **extra}
            for run, d in deltas.items()
        },
    }


def _set_p(tables, p):
    for table in tables:
        for r in table["rows"]:
            for c in r["models"].values():
                c["p"] = p


def test_claims_are_stated_from_the_numbers():
    cfg = ExperimentConfig(
        data={"comments": ["x"]}, conditions={"reddit": "reddit", "nonreddit": "politeness"}
    )
    runs = ["full-reddit", "full-nonreddit", "context-reddit", "context-nonreddit"]
    comparison = {
        "trained": [{"label": r} for r in runs],
        "rows": [
            _cmp_row(
                "pragmatics",
                "pragmatics (mean of 9 tasks)",
                "suite",
                "acc",
                {
                    "full-reddit": 0.01,
                    "full-nonreddit": -0.02,
                    "context-reddit": 0.03,
                    "context-nonreddit": 0.02,
                },
            ),
            _cmp_row("factuality", "truthfulqa_mc", "task", "mc1", {r: -0.01 for r in runs}),
            _cmp_row("factuality", "truthfulqa_mc", "task", "mc2", {r: -0.02 for r in runs}),
        ],
    }
    # claim 3 reads the head-to-head comparisons (context policy vs full policy on the same items)
    head_to_head = {
        cond: {
            "trained": [{"label": f"context-{cond}"}],
            "rows": [
                _cmp_row("pragmatics", "pragmatics (mean of 9 tasks)", "suite", "acc", {f"context-{cond}": d})
            ],
        }
        for cond, d in (("reddit", 0.02), ("nonreddit", 0.04))
    }

    def rm_eval(variant, spearman):
        return {
            "n_examples": 100,
            "n_pairs": 40,
            "systems": {
                f"rm:{variant}": {
                    "overall": {"spearman": spearman, "pearson": 0.2, "pairwise_accuracy": 0.6}
                },
                "length": {"overall": {"spearman": 0.05, "pearson": 0.04, "pairwise_accuracy": 0.52}},
            },
        }

    rm = {"full": rm_eval("full", 0.30), "context": rm_eval("context", 0.20)}
    text = "\n".join(claims(cfg, rm, comparison, head_to_head))
    assert "**Reproduced**: `full` predicts karma better than `context` (Spearman 0.300 vs 0.200)" in text
    assert (
        "Test split: 100 replies, 40 pairs (a Spearman's standard error at this n is about 1/√n = 0.100)."
        in text
    )
    assert "**Partly reproduced** (pragmatics accuracy went up, p < 0.05, in 3 of 4 runs)" in text
    assert (
        "- reddit prompts: pragmatics accuracy, `context-reddit` − `full-reddit`: +0.020 [-0.080, +0.120]*"
        in text
    )
    assert "**Reproduced** (`context` beat `full`, p < 0.05, in all 2 runs)" in text
    assert "**Reproduced** (TruthfulQA went down, p < 0.05, in all 8 runs)" in text
    assert "| baseline: length | 0.050 | 0.040 | 0.520 |" in text

    # the same directions without significance are not a reproduction
    _set_p([comparison, *head_to_head.values()], 0.5)
    text = "\n".join(claims(cfg, rm, comparison, head_to_head))
    assert (
        "**Not reproduced at this scale** (pragmatics accuracy went up in 3 of 4 runs, "
        "none significant at p < 0.05)"
    ) in text
    assert "**Not reproduced at this scale** (`context` beat `full` in 2 of 2 runs, none significant" in text
    assert "**Not reproduced at this scale** (TruthfulQA went down in 8 of 8 runs, none significant" in text
    _set_p([head_to_head["reddit"]], 0.01)
    text = "\n".join(claims(cfg, rm, comparison, head_to_head))
    assert "**Partly reproduced** (`context` beat `full`, p < 0.05, in 1 of 2 runs)" in text
    text = "\n".join(claims(cfg, rm, comparison))  # no head-to-head comparisons: claim 3 is not tested
    assert "- reddit prompts: no head-to-head comparison of `context-reddit` with `full-reddit`" in text
    assert "Not tested (no head-to-head rows)." in text

    _set_p([comparison], 0.01)
    rm["full"]["systems"]["rm:full"]["overall"]["spearman"] = 0.1
    for r in comparison["rows"]:
        for c in r["models"].values():
            c["delta"] = -abs(c["delta"]) if r["suite"] == "pragmatics" else abs(c["delta"])
    text = "\n".join(claims(cfg, rm, comparison, head_to_head))
    assert "**Not reproduced at this scale**: `full` does not predict karma better" in text
    assert "pragmatics accuracy went up" not in text and "TruthfulQA went down" not in text
    for r in comparison["rows"]:  # |Δ| ~ 0 is "no change", neither a rise nor a fall
        for c in r["models"].values():
            c["delta"] = -1e-9
    text = "\n".join(claims(cfg, rm, comparison, head_to_head))
    assert "TruthfulQA went down" not in text


def test_claim_six_compares_the_composed_reward_with_its_base_variant():
    shaped = {
        "components": [
            {"model": "context"},
            {"rule": {"kind": "length_window", "min_words": 5, "max_words": 40}, "weight": 0.5},
            {"rule": {"kind": "distinct_n", "n": 2}, "weight": 0.5, "name": "repetition"},
        ]
    }
    cfg = ExperimentConfig(
        data={"comments": ["x"]}, conditions={"reddit": "reddit"}, composed={"shaped": shaped}
    )
    with pytest.raises(
        ValueError, match="composed reward 'x' reads full, not among rm.variants \\(context\\)"
    ):
        ExperimentConfig(
            data={"comments": ["x"]},
            conditions={"reddit": "reddit"},
            rm={"variants": ["context"]},
            composed={"x": {"components": [{"model": "full"}]}},
        )
    comparison = {
        "trained": [{"label": r} for r in ("context-reddit", "shaped-reddit")],
        "rows": [
            _cmp_row(
                "pragmatics",
                "pragmatics (mean of 9 tasks)",
                "suite",
                "acc",
                {"context-reddit": 0.03, "shaped-reddit": 0.025},
                mde=0.02,
            )
        ],
    }
    h2h = {
        "reddit": {
            "trained": [{"label": "shaped-reddit"}],
            "rows": [
                _cmp_row(
                    "pragmatics",
                    "pragmatics (mean of 9 tasks)",
                    "suite",
                    "acc",
                    {"shaped-reddit": -0.005},
                    p=0.6,
                    mde=0.03,
                ),
                _cmp_row("factuality", "truthfulqa_mc", "task", "mc1", {"shaped-reddit": 0.04}, mde=0.03),
            ],
        }
    }
    rm = {v: {"systems": {}} for v in cfg.variants}
    text = "\n".join(claims(cfg, rm, comparison, None, {"shaped": h2h}))
    assert "### 6. Composed reward `shaped` = 1*context+0.5*length_window+0.5*repetition" in text
    assert "(a) **Reproduced** (pragmatics went up, p < 0.05, in all 1 runs)" in text
    assert (
        "(b) pragmatics against `context`: no significant loss in 1 runs: no effect larger than 0.030" in text
    )
    assert "(c) **Reproduced** (TruthfulQA higher than with `context`, p < 0.05, in all 1 runs)" in text
    h2h["reddit"]["rows"][0]["models"]["shaped-reddit"].update(delta=-0.04, p=0.01)
    text = "\n".join(claims(cfg, rm, comparison, None, {"shaped": h2h}))
    assert "(b) pragmatics against `context`: **lower** in 1 of 1 runs (p < 0.05)" in text
    text = "\n".join(claims(cfg, rm, comparison, None, None))
    assert "- reddit prompts: no head-to-head comparison of `shaped-reddit` with `context-reddit`" in text


def test_claims_decide_on_the_calibrated_score_with_accuracy_beside_it():
    """Results format 2: claims 2, 3, 5 and 6 decide on p_correct_cal; accuracy (MC1, MC2) only stands beside it,
    and each run's line says Δ with its CI, p, n and the MDE."""
    shaped = {"components": [{"model": "context"}, {"rule": {"kind": "distinct_n", "n": 2}, "weight": 0.5}]}
    cfg = ExperimentConfig(
        data={"comments": ["x"]}, conditions={"reddit": "reddit"}, composed={"shaped": shaped}
    )
    runs = ["full-reddit", "context-reddit", "shaped-reddit"]
    suite = "pragmatics (mean of 9 tasks)"
    comparison = {
        "trained": [{"label": r} for r in runs],
        "rows": [
            # accuracy did not move (no answer flipped); the calibrated probability rose significantly
            _cmp_row(
                "pragmatics",
                suite,
                "suite",
                "acc",
                dict.fromkeys(runs, 0.0),
                p=1.0,
                mde=0.012,
                discordance=0.0,
            ),
            _cmp_row(
                "pragmatics", suite, "suite", "p_correct_cal", dict.fromkeys(runs, 0.004), p=0.002, mde=0.003
            ),
            _cmp_row("factuality", "truthfulqa_mc", "task", "mc1", dict.fromkeys(runs, 0.0), p=1.0, mde=0.05),
            _cmp_row(
                "factuality", "truthfulqa_mc", "task", "mc2", dict.fromkeys(runs, -0.002), p=0.3, mde=0.004
            ),
            _cmp_row(
                "factuality",
                "truthfulqa_mc",
                "task",
                "p_correct_cal",
                dict.fromkeys(runs, -0.003),
                p=0.04,
                mde=0.004,
            ),
        ],
    }
    for c in comparison["rows"][1]["models"].values():
        c["ci_low"], c["ci_high"] = 0.002, 0.006
    h2h_ctx = {
        "trained": [{"label": "context-reddit"}],
        "rows": [
            _cmp_row("pragmatics", suite, "suite", "acc", {"context-reddit": 0.001}, p=1.0, mde=0.012),
            _cmp_row(
                "pragmatics", suite, "suite", "p_correct_cal", {"context-reddit": 0.002}, p=0.3, mde=0.003
            ),
        ],
    }
    h2h_shaped = {
        "trained": [{"label": "shaped-reddit"}],
        "rows": [
            _cmp_row(
                "pragmatics", suite, "suite", "p_correct_cal", {"shaped-reddit": -0.001}, p=0.6, mde=0.004
            ),
            _cmp_row(
                "factuality",
                "truthfulqa_mc",
                "task",
                "p_correct_cal",
                {"shaped-reddit": 0.003},
                p=0.01,
                mde=0.002,
            ),
        ],
    }
    rm = {v: {"systems": {}} for v in cfg.variants}
    text = "\n".join(claims(cfg, rm, comparison, {"reddit": h2h_ctx}, {"shaped": {"reddit": h2h_shaped}}))
    assert (
        "- `full-reddit`: Δ p_correct_cal +0.004 [+0.002, +0.006]* (p=0.002, n=40, MDE 0.003); "
        "beside it: acc +0.000 [-0.100, +0.100] (p=1, n=40, MDE 0.012, discordance 0.000)"
    ) in text
    assert (
        "**Reproduced** (calibrated P(correct) on pragmatics went up, p < 0.05, in all 3 runs) "
        "(MDE 0.003 at 80 % power, n = 40)"
    ) in text
    assert "Measured: pragmatics (mean of 9 tasks), the unweighted mean of the task means, per run Δ" in text
    assert (
        "- reddit prompts: pragmatics, `context-reddit` − `full-reddit`: Δ p_correct_cal +0.002 [-0.098, +0.102] "
        "(p=0.3, n=40, MDE 0.003); beside it: acc +0.001"
    ) in text
    assert (
        "**Not reproduced at this scale** (`context` beat `full` on calibrated P(correct) in 1 of 1 runs, none "
        "significant at p < 0.05): no effect larger than 0.003 (MDE at 80 % power, n = 40)"
    ) in text
    assert (
        "- `context-reddit` truthfulqa_mc: Δ p_correct_cal -0.003 [-0.103, +0.097]* (p=0.04, n=40, MDE 0.004); "
        "beside it: mc1 +0.000 [-0.100, +0.100] (p=1, n=40, MDE 0.050); mc2 -0.002"
    ) in text
    assert "**Reproduced** (calibrated P(true) on TruthfulQA went down, p < 0.05, in all 3 runs)" in text
    assert "(a) **Reproduced** (calibrated P(correct) on pragmatics went up, p < 0.05, in all 1 runs)" in text
    assert (
        "(b) pragmatics against `context`: no significant loss in 1 runs: no effect larger than 0.004" in text
    )
    assert (
        "(c) **Reproduced** (TruthfulQA higher than with `context` (calibrated P(true)), p < 0.05, in all 1 runs)"
        in text
    )
    assert "results format 1" not in text and "pragmatics accuracy went up" not in text


# ------------------------------------------------------------------------------------ power beside the verdicts
def _power_comparison(mde, n=150, p=0.5, delta=0.01):
    runs = ["full-reddit", "context-reddit"]
    rows = [
        _cmp_row(
            "pragmatics",
            "pragmatics (mean of 9 tasks)",
            "suite",
            "acc",
            dict.fromkeys(runs, delta),
            p,
            mde=mde,
            discordance=0.1 if mde is not None else None,
        ),
        _cmp_row("side_effects", "hhh_alignment", "family", "acc", dict.fromkeys(runs, 0.0), 0.9, mde=0.09),
        _cmp_row(
            "side_effects", "generation", "task", "length_tokens", dict.fromkeys(runs, -1.5), 0.02, mde=2.5
        ),
        _cmp_row("factuality", "truthfulqa_mc", "task", "mc2", dict.fromkeys(runs, -delta), p, mde=mde),
    ]
    for r in rows:
        for c in r["models"].values():
            c["n"] = n
    return {"trained": [{"label": r} for r in runs], "rows": rows}


def test_verdicts_state_n_and_the_minimum_detectable_effect():
    assert POWER == P.POWER and PLAUSIBLE_EFFECT == 0.05
    cfg = ExperimentConfig(
        data={"comments": ["x"]}, conditions={"reddit": "reddit"}, rm={"variants": ["full", "context"]}
    )
    rm = {
        v: {"n_examples": 100, "n_pairs": 40, "systems": {f"rm:{v}": {"overall": {"spearman": 0.1}}}}
        for v in ("full", "context")
    }
    h2h = {
        "reddit": {
            "trained": [{"label": "context-reddit"}],
            "rows": [
                _cmp_row(
                    "pragmatics",
                    "pragmatics (mean of 9 tasks)",
                    "suite",
                    "acc",
                    {"context-reddit": 0.0},
                    1.0,
                    mde=0.31,
                    discordance=0.4,
                )
            ],
        }
    }
    text = "\n".join(claims(cfg, rm, _power_comparison(0.041, n=1303), h2h))
    # claim 2: not significant, well powered: the MDE bounds the effect
    assert (
        "- `full-reddit`: Δ pragmatics accuracy (mean over tasks) +0.010 [-0.090, +0.110] "
        "(p=0.5, n=1303, MDE 0.041, discordance 0.100)"
    ) in text
    assert (
        "**Not reproduced at this scale** (pragmatics accuracy went up in 2 of 2 runs, none significant at "
        "p < 0.05): no effect larger than 0.041 (MDE at 80 % power, n = 1,303)"
    ) in text
    # claim 3: the head-to-head MDE is above any plausible effect
    assert (
        "**Not reproduced at this scale**: underpowered: MDE 0.310 exceeds any plausible effect (5 points) "
        "at n = 40"
    ) in text
    # claim 4: every line says n and each run's MDE on the metric's scale
    assert (
        "- hhh_alignment / acc (n = 1,303): `full-reddit` +0.000 (MDE 0.090), `context-reddit` +0.000 (MDE 0.090)"
        in text
    )
    assert "- generation / length_tokens (n = 1,303): `full-reddit` -1.500* (MDE 2.500)" in text
    # claim 5
    assert (
        "TruthfulQA went down in 2 of 2 runs, none significant at p < 0.05): no effect larger than 0.041"
        in text
    )

    text = "\n".join(claims(cfg, rm, _power_comparison(0.2, n=15)))
    assert ": underpowered: MDE 0.200 exceeds any plausible effect (5 points) at n = 15" in text
    text = "\n".join(claims(cfg, rm, _power_comparison(float("inf"), n=4)))
    assert (
        ": underpowered: at n = 4 no result could reach p < 0.05 (exact McNemar and sign-flip tests need at "
        "least 6 changed items)"
    ) in text
    assert "MDE ∞" in text
    text = "\n".join(claims(cfg, rm, _power_comparison(0.03, n=800, p=0.001, delta=0.05)))
    assert (
        "**Reproduced** (pragmatics accuracy went up, p < 0.05, in all 2 runs) (MDE 0.030 at 80 % power, n = 800)"
        in text
    )
    text = "\n".join(
        claims(cfg, rm, _power_comparison(None, n=40))
    )  # a comparison from before MDEs were recorded
    assert "none significant at p < 0.05) (MDE not recorded, n = 40)" in text


def _heldout(**over):
    return {
        "n": 64,
        "source": "politeness hold-out",
        "base_mean": 0.10,
        "trained_mean": 0.25,
        "delta": 0.15,
        "ci_low": 0.05,
        "ci_high": 0.26,
        "p": 0.004,
        "test": "paired permutation",
        "mde": 0.09,
        "kl_mean": 0.8,
        "base_eos_rate": 0.2,
        "trained_eos_rate": 0.5,
        "base_mean_words": 30.5,
        "trained_mean_words": 22.0,
        **over,
    }


def test_ppo_table_reads_heldout_reward_when_present(tmp_path):
    new, old, broken, bare = (tmp_path / n for n in ("new", "old", "broken", "bare"))
    for d in (new, old, broken):
        d.mkdir()
        (d / "metrics.jsonl").write_text(
            "".join(
                json.dumps(r) + "\n"
                for r in [
                    {"step": 1, "reward/mean": 0.1, "objective/kl": 0.0},
                    {"step": 2, "reward/mean": 0.3, "objective/kl": 0.02},
                    {"step": 2, "heldout/reward_mean": 0.25},
                ]
            )
        )  # not a training step
    (new / "heldout_reward.json").write_text(json.dumps(_heldout()))
    (broken / "heldout_reward.json").write_text("{oops")
    bare.mkdir()
    summary = {d.name: training_summary(d) for d in (new, old, broken, bare)}
    assert summary["old"] == {"steps": 2, "reward_first": 0.1, "reward_last": 0.3, "kl_last": 0.02}
    assert summary["new"]["heldout"] == _heldout() and summary["new"]["steps"] == 2
    assert summary["broken"]["heldout"]["error"].startswith("unreadable heldout_reward.json")
    assert summary["bare"] == {}

    cfg = ExperimentConfig(data={"comments": ["x"]}, conditions={"reddit": "reddit"}, smoke=True, name="q")
    comparison = {"trained": [], "rows": []}
    rm = {v: {"systems": {}} for v in cfg.variants}
    text = write_report(cfg, tmp_path, rm, comparison, summary, {"total": 1.0}).read_text()
    assert (
        "| new | 2 | 0.100 | 0.300 | 0.0200 | 0.100 → 0.250 (n = 64) | +0.150 [+0.050, +0.260]* | 0.004 | 0.090 "
        "| 0.800 | 30.5 → 22.0 / 0.20 → 0.50 |"
    ) in text
    assert "| old | 2 | 0.100 | 0.300 | 0.0200 | not recorded (older run) | — | — | — | — | — |" in text
    assert "| broken | 2 | 0.100 | 0.300 | 0.0200 | unreadable heldout_reward.json: " in text
    assert "| bare | — | — | — | — | not recorded (older run) |" in text
    assert "Held-out prompts: politeness hold-out." in text
    assert "**Smoke run** (`q`): sizes far below the paper's" in text and "underpowered by design" in text
    cfg.smoke = False
    assert "Smoke run" not in write_report(cfg, tmp_path, rm, comparison, summary, {}).read_text()


def test_claim_three_shows_each_runs_reward_spread(tmp_path):
    """Beside claim 3, per run (RM variant x condition): the training reward's within- and across-prompt sd
    (mean over the steps that logged them) and the held-out ones, base -> trained; runs from before these
    were logged show dashes."""
    cfg = ExperimentConfig(
        data={"comments": ["x"]}, conditions={"reddit": "reddit", "nonreddit": "politeness"}
    )
    steps = {
        "context-reddit": [(0.5, 0.2), (0.7, 0.4)],
        "full-reddit": [(0.1, 0.9), (0.2, 1.1)],
        "context-nonreddit": [(None, 0.3), (None, 0.5)],  # 1 sample per prompt: no within-prompt sd
    }
    runs = ("full-reddit", "context-reddit", "context-nonreddit", "full-nonreddit")
    for run in runs:
        d = tmp_path / run
        d.mkdir()
        rows = [{"step": i + 1, "reward/mean": 0.1, "objective/kl": 0.0} for i in range(2)]
        for row, (within, across) in zip(rows, steps.get(run, []), strict=False):
            row["reward/across_prompt_sd"] = across
            if within is not None:
                row["reward/within_prompt_sd"] = within
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "context-reddit" / "heldout_reward.json").write_text(
        json.dumps(
            _heldout(
                samples_per_prompt=4,
                base_within_prompt_sd=0.61,
                trained_within_prompt_sd=0.42,
                base_across_prompt_sd=0.3,
                trained_across_prompt_sd=0.35,
            )
        )
    )
    (tmp_path / "full-reddit" / "heldout_reward.json").write_text(
        json.dumps(
            _heldout(
                samples_per_prompt=1,
                base_within_prompt_sd=None,
                trained_within_prompt_sd=None,
                base_across_prompt_sd=0.8,
                trained_across_prompt_sd=0.9,
            )
        )
    )
    summary = {run: training_summary(tmp_path / run) for run in runs}
    assert summary["context-reddit"]["reward_within_prompt_sd"] == pytest.approx(0.6, abs=1e-12)
    assert summary["context-reddit"]["reward_across_prompt_sd"] == pytest.approx(0.3, abs=1e-12)
    assert "reward_within_prompt_sd" not in summary["context-nonreddit"]
    assert summary["context-nonreddit"]["reward_across_prompt_sd"] == pytest.approx(0.4, abs=1e-12)
    assert not {"reward_within_prompt_sd", "reward_across_prompt_sd"} & set(summary["full-nonreddit"])

    comparison = {"trained": [], "rows": []}
    rm = {v: {"systems": {}} for v in cfg.variants}
    text = write_report(cfg, tmp_path, rm, comparison, summary, {}).read_text()
    claim3 = text[text.index("### 3.") : text.index("### 4.")]
    assert "arXiv 2503.15477" in claim3 and "more **within-prompt** spread" in claim3
    assert "| `full` | reddit | 0.150 | 1.000 | — | 0.800 → 0.900 | 1 |" in claim3
    assert "| `context` | reddit | 0.600 | 0.300 | 0.610 → 0.420 | 0.300 → 0.350 | 4 |" in claim3
    assert "| `context` | nonreddit | — | 0.400 | — | — | — |" in claim3
    assert "| `full` | nonreddit | — | — | — | — | — |" in claim3
    # ordered by condition, in the config's order
    assert claim3.index("| `context` | reddit") < claim3.index("| `context` | nonreddit")
    assert "Reward spread per run" not in "\n".join(claims(cfg, rm, comparison))  # no training summaries


def _pragmatics_units(cfg):
    """Items per unit of the pragmatics suite mean (families pooled) that a preset's evaluation scores."""
    from karma.eval.tasks import load_tasks

    options = cfg.eval
    tasks = load_tasks(
        options.suites,
        limit=options.limit,
        task_limits=options.task_limits,
        data_dir=SHARED,
        n_prompts=1,
    )
    units: dict[str, int] = {}
    for t in tasks:
        if t.suite == "pragmatics":
            units[t.family] = units.get(t.family, 0) + len(t.items)
    return units, {t.name: len(t.items) for t in tasks}


def test_presets_are_sized_by_power():
    """The cpu preset reaches MDE <= 5 points on the pragmatics mean even at 30 % discordance; quick cannot."""
    if not (SHARED / "eval").exists():
        pytest.skip("shared data not available")
    cpu_units, cpu_tasks = _pragmatics_units(ExperimentConfig.load("cpu"))
    assert len(cpu_units) == 9 and cpu_units["implicatures"] == 492 and cpu_units["social_iqa"] == 100
    assert cpu_tasks["truthfulqa_mc"] == 150 and "truthful_qa" not in cpu_tasks
    ns = list(cpu_units.values())
    assert P.mde_mean_of_means([0.3] * 9, ns) <= 0.05
    assert P.mde_mean_of_means([0.3] * 9, ns) == pytest.approx(0.045, abs=0.001)
    quick_units, _ = _pragmatics_units(ExperimentConfig.load("quick"))
    assert sum(quick_units.values()) == 150
    quick = [P.mde_mean_of_means([d] * 9, list(quick_units.values())) for d in (0.0, 0.1, 0.3)]
    assert all(m > PLAUSIBLE_EFFECT for m in quick)
    default_units, _ = _pragmatics_units(ExperimentConfig.load("default"))
    assert sum(default_units.values()) == 5892
    assert P.mde_mean_of_means([0.3] * 9, list(default_units.values())) == pytest.approx(0.038, abs=0.001)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_experiment_end_to_end_tiny(tmp_path):
    """Every stage for real at a tiny size: prepare → 2 RMs → `karma serve` process → PPO over HTTP ×2 → eval → report."""
    if not (SHARED / "reddit").exists():
        pytest.skip("shared data not available")
    from karma.experiment import run_experiment

    cfg = ExperimentConfig(
        name="tiny",
        out=str(tmp_path / "exp"),
        data={
            "comments": [str(SHARED / "reddit/college_2011_2022/RC_college.zst")],
            "submissions": [str(SHARED / "reddit/college_2011_2022/RS_college.zst")],
            "limit": 20000,
        },
        rm={
            "variants": ["full", "context"],
            "max_train": 64,
            "max_eval": 64,
            "max_length": 64,
            "batch_size": 16,
            "epochs": 1,
        },
        rm_eval={"max_examples": 200, "max_pairs": 100},
        conditions={"reddit": "reddit", "nonreddit": "politeness"},
        train={
            "model": {"policy": "smollm2"},
            "rollout": {"engine": "hf", "max_new_tokens": 8},
            "ppo": {"prompts_per_step": 2, "mini_batch_size": 2, "micro_batch_size": 2, "epochs": 1},
            "data": {"max_prompt_length": 96, "max_prompts": 16},
            "run": {"steps": 1, "save_every": 0},
            "eval": {"heldout_prompts": 4},
        },
        eval={
            "suites": "implicatures,truthfulqa_mc,hhh_alignment,generation",
            "limit": 4,
            "n_prompts": 2,
            "max_new_tokens": 8,
        },
        composed={  # issue 15's condition: the context RM + a length window + a repetition penalty
            "context_shaped": {
                "components": [
                    {"model": "context"},
                    {"rule": {"kind": "length_window", "min_words": 3, "max_words": 30}, "weight": 0.5},
                    {"rule": {"kind": "distinct_n", "n": 2}, "weight": 0.5, "name": "repetition"},
                ]
            }
        },
    )
    report = run_experiment(cfg)
    text = report.read_text()
    assert "### 1. The best karma predictor" in text and "### 5. Factuality drops" in text
    out = Path(cfg.out)
    from karma.experiment.stages import planned_stages

    assert list(json.loads((out / "timings.json").read_text())) == [*planned_stages(cfg), "total"]
    assert "### 6. Composed reward `context_shaped` = 1*context+0.5*length_window+0.5*repetition" in text
    for cond in ("reddit", "nonreddit"):
        # one pragmatics task (implicatures) makes no suite-mean row, so (b) has nothing to compare; TruthfulQA does
        assert (
            f"- {cond} prompts: truthfulqa_mc, `context_shaped-{cond}` − `context-{cond}`: Δ p_correct_cal "
            in text
        )
        assert (out / "compare" / f"context_shaped-{cond}_vs_context-{cond}" / "compare.json").exists()
    rows = [
        json.loads(line)
        for line in (out / "policies/context_shaped-reddit/metrics.jsonl").read_text().splitlines()
    ]
    assert rows and all(r["reward/version"] for r in rows)  # trained against the composed endpoint
    for run in (
        "full-reddit",
        "full-nonreddit",
        "context-reddit",
        "context-nonreddit",
        "context_shaped-reddit",
    ):
        assert (out / "policies" / run / "config.json").exists()
        res = json.loads((out / "eval" / run / "results.json").read_text())
        assert "truthfulqa_mc" in res["tasks"]
    cmp = json.loads((out / "compare" / "compare.json").read_text())
    assert {t["label"] for t in cmp["trained"]} == {
        "full-reddit",
        "full-nonreddit",
        "context-reddit",
        "context-nonreddit",
        "context_shaped-reddit",
        "context_shaped-nonreddit",
    }
    # every compared row states its MDE; 4 items per task can never reach p < 0.05 under exact McNemar
    cells = [c for r in cmp["rows"] for c in r["models"].values()]
    assert cells and all("mde" in c and "mde_basis" in c for c in cells)
    imp = next(r for r in cmp["rows"] if r["row"] == "implicatures" and r["metric"] == "acc")
    assert all(c["mde"] == float("inf") for c in imp["models"].values())
    assert (
        ": underpowered: at n = 4 no result could reach p < 0.05 (exact McNemar and sign-flip tests" in text
    )
    assert all(
        c["mde"] == float("inf")
        for r in cmp["rows"]
        if r["row"] == "truthfulqa_mc"
        for c in r["models"].values()
    )
    # each PPO run measured its held-out reward (heldout_reward.json) and the report's PPO table shows it
    for run in ("full-reddit", "full-nonreddit", "context-reddit", "context-nonreddit"):
        heldout = json.loads((out / "policies" / run / "heldout_reward.json").read_text())
        assert heldout["n"] == 4
        assert (
            f"| {run} | 1 |" in text
            and f"{heldout['base_mean']:.3f} → {heldout['trained_mean']:.3f} (n = 4)" in text
        )
    # every policy's generated replies got a real reward from the judge RM over HTTP
    base = json.loads((out / "eval" / "base" / "results.json").read_text())
    replies = base["tasks"]["generation"]["items"]
    assert all(isinstance(it["scores"]["reward"], float) for it in replies)


def test_the_readme_lists_the_demos_stages_as_the_demo_runs_them():
    """README's measured demo table names exactly the stages `karma demo` times (timings.json), in order."""
    from karma.experiment import ExperimentConfig
    from karma.experiment.stages import planned_stages

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("<!-- demo-stages -->")[1]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")]
    assert rows[0] == "stage" and rows[-1] == "total"
    assert rows[1:-1] == planned_stages(ExperimentConfig.load("demo"))
