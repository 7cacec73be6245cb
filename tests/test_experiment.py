"""`karma experiment` / `karma demo`: config validation, --data discovery, claim verdicts, and (slow) the
whole pipeline end to end at a tiny size with a real reward-service process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from karma.experiment import ExperimentConfig, claims, data_spec_from_path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_presets_load_and_validate():
    for preset in ("quick", "default", "demo"):
        cfg = ExperimentConfig.load(preset)
        assert cfg.variants and cfg.conditions
    assert ExperimentConfig.load("quick").variants == ["full", "context"]
    assert ExperimentConfig.load("quick", {"train.run.steps": 2}).train["run"]["steps"] == 2


def test_bad_configs_fail_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="rm.variants must be a non-empty list"):
        ExperimentConfig(data={"comments": ["x"]}, rm={"variants": ["karma"]}, conditions={"r": "reddit"})
    with pytest.raises(ValueError, match="prompt source must be 'reddit', 'politeness' or 'file:PATH'"):
        ExperimentConfig(data={"comments": ["x"]}, conditions={"r": "twitter"})
    with pytest.raises(ValueError, match="data is empty"):
        ExperimentConfig(conditions={"r": "reddit"})
    bad = tmp_path / "x.yaml"
    bad.write_text("name: x\nsteps: 3\n")
    with pytest.raises(ValueError, match="unknown key\\(s\\) steps"):
        ExperimentConfig.load(str(bad))
    with pytest.raises(FileNotFoundError, match="experiment config not found"):
        ExperimentConfig.load(str(tmp_path / "missing.yaml"))


def test_data_spec_from_path(tmp_path):
    (tmp_path / "RC_2020-01.zst").write_bytes(b"")
    (tmp_path / "RS_2020-01.zst").write_bytes(b"")
    (tmp_path / "shp_rows.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("")
    spec = data_spec_from_path(tmp_path)
    assert spec == {"comments": [str(tmp_path / "RC_2020-01.zst")], "submissions": [str(tmp_path / "RS_2020-01.zst")],
                    "shp": [str(tmp_path / "shp_rows.jsonl")]}
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


def _cmp_row(suite, row, kind, metric, deltas, p=0.01):
    return {"suite": suite, "row": row, "kind": kind, "metric": metric,
            "models": {run: {"delta": d, "ci_low": d - 0.1, "ci_high": d + 0.1, "p": p, "n": 40}
                       for run, d in deltas.items()}}


def _set_p(tables, p):
    for table in tables:
        for r in table["rows"]:
            for c in r["models"].values():
                c["p"] = p


def test_claims_are_stated_from_the_numbers():
    cfg = ExperimentConfig(data={"comments": ["x"]}, conditions={"reddit": "reddit", "nonreddit": "politeness"})
    runs = ["full-reddit", "full-nonreddit", "context-reddit", "context-nonreddit"]
    comparison = {
        "trained": [{"label": r} for r in runs],
        "rows": [
            _cmp_row("pragmatics", "pragmatics (mean of 9 tasks)", "suite", "acc",
                     {"full-reddit": 0.01, "full-nonreddit": -0.02, "context-reddit": 0.03, "context-nonreddit": 0.02}),
            _cmp_row("factuality", "truthfulqa_mc", "task", "mc1", {r: -0.01 for r in runs}),
            _cmp_row("factuality", "truthfulqa_mc", "task", "mc2", {r: -0.02 for r in runs}),
        ],
    }
    # claim 3 reads the head-to-head comparisons (context policy vs full policy on the same items)
    head_to_head = {cond: {"trained": [{"label": f"context-{cond}"}], "rows": [
        _cmp_row("pragmatics", "pragmatics (mean of 9 tasks)", "suite", "acc", {f"context-{cond}": d})]}
        for cond, d in (("reddit", 0.02), ("nonreddit", 0.04))}

    def rm_eval(variant, spearman):
        return {"n_examples": 100, "n_pairs": 40, "systems": {
            f"rm:{variant}": {"overall": {"spearman": spearman, "pearson": 0.2, "pairwise_accuracy": 0.6}},
            "length": {"overall": {"spearman": 0.05, "pearson": 0.04, "pairwise_accuracy": 0.52}}}}

    rm = {"full": rm_eval("full", 0.30), "context": rm_eval("context", 0.20)}
    text = "\n".join(claims(cfg, rm, comparison, head_to_head))
    assert "**Reproduced**: `full` predicts karma better than `context` (Spearman 0.300 vs 0.200)" in text
    assert "Test split: 100 replies, 40 pairs (a Spearman's standard error at this n is about 1/√n = 0.100)." in text
    assert "**Partly reproduced** (pragmatics accuracy went up, p < 0.05, in 3 of 4 runs)" in text
    assert "- reddit prompts: pragmatics accuracy, `context-reddit` − `full-reddit`: +0.020 [-0.080, +0.120]*" in text
    assert "**Reproduced** (`context` beat `full`, p < 0.05, in all 2 runs)" in text
    assert "**Reproduced** (TruthfulQA went down, p < 0.05, in all 8 runs)" in text
    assert "| baseline: length | 0.050 | 0.040 | 0.520 |" in text

    # the same directions without significance are not a reproduction
    _set_p([comparison, *head_to_head.values()], 0.5)
    text = "\n".join(claims(cfg, rm, comparison, head_to_head))
    assert ("**Not reproduced at this scale** (pragmatics accuracy went up in 3 of 4 runs, "
            "none significant at p < 0.05)") in text
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
        data={"comments": [str(SHARED / "reddit/college_2011_2022/RC_college.zst")],
              "submissions": [str(SHARED / "reddit/college_2011_2022/RS_college.zst")], "limit": 20000},
        rm={"variants": ["full", "context"], "max_train": 64, "max_eval": 64, "max_length": 64, "batch_size": 16,
            "epochs": 1},
        rm_eval={"max_examples": 200, "max_pairs": 100},
        conditions={"reddit": "reddit", "nonreddit": "politeness"},
        train={"model": {"policy": "smollm2"}, "rollout": {"engine": "hf", "max_new_tokens": 8},
               "ppo": {"prompts_per_step": 2, "mini_batch_size": 2, "micro_batch_size": 2, "epochs": 1},
               "data": {"max_prompt_length": 96, "max_prompts": 16}, "run": {"steps": 1, "save_every": 0}},
        eval={"suites": "implicatures,truthfulqa_mc,hhh_alignment,generation", "limit": 4, "n_prompts": 2,
              "max_new_tokens": 8},
    )
    report = run_experiment(cfg)
    text = report.read_text()
    assert "### 1. The best karma predictor" in text and "### 5. Factuality drops" in text
    out = Path(cfg.out)
    for run in ("full-reddit", "full-nonreddit", "context-reddit", "context-nonreddit"):
        assert (out / "policies" / run / "config.json").exists()
        res = json.loads((out / "eval" / run / "results.json").read_text())
        assert "truthfulqa_mc" in res["tasks"]
    cmp = json.loads((out / "compare" / "compare.json").read_text())
    assert {t["label"] for t in cmp["trained"]} == {"full-reddit", "full-nonreddit", "context-reddit", "context-nonreddit"}
    # every policy's generated replies got a real reward from the judge RM over HTTP
    base = json.loads((out / "eval" / "base" / "results.json").read_text())
    replies = base["tasks"]["generation"]["items"]
    assert all(isinstance(it["scores"]["reward"], float) for it in replies)
