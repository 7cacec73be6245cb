"""The continuous, bias-controlled outcome of multiple-choice tasks: `p_correct` (probability mass on the correct
options) and `p_correct_cal` (the same after contextual calibration against the task's content-free prompt),
from hand-made log-likelihoods up to `run_eval` → `compare` → the experiment's claim lines, with a scripted LM
whose log-likelihoods the tests choose (no model: a label-prior shift and a content-dependent improvement are
exact transformations of them)."""

from __future__ import annotations

import copy
import hashlib
import math
from types import SimpleNamespace

import numpy as np
import pytest

from karma.eval import compare, run_eval
from karma.eval import metrics as M
from karma.eval.comparison import fmt_mde, load_results
from karma.eval.tasks import (
    TRUTHFULQA_PRIMER,
    content_free_requests,
    join,
    load_tasks,
    requests,
)
from karma.experiment import ExperimentConfig, claims
from karma.paths import shared_data_dir

DATA = shared_data_dir()
EPS = np.finfo(float).eps
# a softmax over k options costs O(k) float operations on values of magnitude <= 1: a few ulps
TOL = 16 * EPS


# ------------------------------------------------------------------------------------ the arithmetic
def test_p_correct_is_the_softmax_mass_on_the_correct_options():
    ll = [-1.2, -0.3, -2.5]
    e = [math.exp(x) for x in ll]
    assert M.p_correct(ll, {0, 2}) == pytest.approx((e[0] + e[2]) / sum(e), abs=TOL)
    assert M.p_correct(ll, [1]) == pytest.approx(e[1] / sum(e), abs=TOL)
    # calibrated: the softmax of ll - content-free ll
    cf = [-0.2, -0.1, -3.0]
    z = [math.exp(a - b) for a, b in zip(ll, cf, strict=True)]
    assert M.p_correct(ll, [1], content_free=cf) == pytest.approx(z[1] / sum(z), abs=TOL)
    # TruthfulQA: p_correct over MC2's options is mc2 itself
    true = [True, False, True]
    assert M.mc2(ll, true) == M.p_correct(ll, [0, 2])
    # stable far from 0, invariant to an offset shared by every option
    assert M.p_correct([-1000.0, -1001.0], [0]) == pytest.approx(1 / (1 + math.exp(-1)), abs=TOL)
    with pytest.raises(ValueError, match="out of range"):
        M.p_correct(ll, [3])
    with pytest.raises(ValueError, match="3 log-likelihoods but 2 content-free"):
        M.p_correct(ll, [0], content_free=[0.0, 0.0])


def test_a_label_prior_shift_leaves_p_correct_cal_unchanged_but_moves_p_correct_and_accuracy():
    """The model comes to prefer the option "yes" by 2 nats everywhere — after the real prompt and after the
    content-free one alike: accuracy and p_correct move, p_correct_cal does not."""
    ll, cf, correct = [-0.9, -0.5], [-0.8, -0.6], {1}  # options ("yes", "no"); "no" is right
    prior = np.array([2.0, 0.0])
    shifted, shifted_cf = list(np.add(ll, prior)), list(np.add(cf, prior))
    assert M.mc_scores(ll, [3, 2], correct)["acc"] == 1.0
    assert M.mc_scores(shifted, [3, 2], correct)["acc"] == 0.0  # the answer flipped to "yes"
    assert M.p_correct(shifted, correct) < M.p_correct(ll, correct) - 0.3
    before = M.p_correct(ll, correct, content_free=cf)
    assert M.p_correct(shifted, correct, content_free=shifted_cf) == pytest.approx(before, abs=TOL)
    # by hand: softmax of (ll - cf) = (-0.1, +0.1): mass on "no" = 1 / (1 + e^-0.2)
    assert before == pytest.approx(1 / (1 + math.exp(-0.2)), abs=TOL)


def test_a_content_dependent_improvement_raises_p_correct_cal():
    """Raising the right option by δ after this item's prompt only (the content-free prompt knows nothing of
    the item) multiplies its calibrated odds by e^δ."""
    ll, cf, correct = [-1.0, -1.5, -0.7], [-0.9, -1.4, -1.1], {0}
    delta = 0.5
    better = [ll[0] + delta, *ll[1:]]
    p0 = M.p_correct(ll, correct, content_free=cf)
    p1 = M.p_correct(better, correct, content_free=cf)
    assert p1 > p0
    assert p1 / (1 - p1) == pytest.approx(math.exp(delta) * p0 / (1 - p0), rel=64 * EPS)


# ------------------------------------------------------------------------------------ the requests
def test_content_free_prompts_keep_the_template_and_drop_the_item():
    tasks = {t.name: t for t in load_tasks("implicatures,social_iqa,truthfulqa_mc", limit=5, data_dir=DATA)}
    imp = tasks["implicatures"].items
    assert imp[0].cf_prompt == "Does Speaker 2's answer mean yes or no? \n\nQ: N/A \nA: "
    # social_iqa appends its choices to the input: the whole example input goes, choices included
    assert tasks["social_iqa"].items[0].cf_prompt == "\nQ: N/A\nA: "
    assert tasks["truthfulqa_mc"].items[0].cf_prompt == TRUTHFULQA_PRIMER + "\n\nQ: N/A\nA:"
    for t in tasks.values():
        assert len({it.cf_prompt for it in t.items}) == 1  # a task's items share it


def test_content_free_requests_are_one_per_distinct_option_of_a_task():
    for limit in (5, 50):
        tasks = load_tasks("implicatures,entailed_polarity", limit=limit, data_dir=DATA)
        cf = content_free_requests(tasks)
        assert len(cf) == 4  # yes / no after each task's content-free prompt, whatever the number of items
        assert not set(cf) & set(requests(tasks))
    tqa = load_tasks("truthfulqa_mc", limit=6, data_dir=DATA)
    distinct = {o for it in tqa[0].items for o in it.continuations()}
    assert len(content_free_requests(tqa)) == len(distinct)
    # a pair that is already a real request is not scored twice
    first = content_free_requests(tqa)[0]
    assert first not in content_free_requests(tqa, exclude=[first])
    # the demo's evaluation (3 suites, 10 items per task): 558 real pairs, 321 content-free ones
    demo = load_tasks("pragmatics,side_effects,factuality", limit=10, data_dir=DATA, n_prompts=2)
    own = requests(demo)
    extra = content_free_requests(demo, exclude=own)
    assert (len(own), len(extra), len({c for c, _ in extra})) == (558, 321, 11)


# ------------------------------------------------------------------------------------ scripted LM, end to end
def _noise(context: str, continuation: str) -> float:
    """A deterministic 'model': a log-likelihood in [-4, -0.5) from a hash of the pair."""
    h = int(hashlib.sha256(f"{context}\x00{continuation}".encode()).hexdigest()[:8], 16)
    return -0.5 - 3.5 * h / 2**32


class ScriptedLM:
    """Stands in for `CausalLM` in `run_eval(lm=...)`: log-likelihoods from `fn(context, continuation)`."""

    name = "scripted"
    device = "cpu"
    tokenizer = SimpleNamespace(chat_template=None)

    def __init__(self, fn):
        import torch

        self.fn = fn
        self.model = torch.nn.Linear(1, 1)
        self.calls: list[int] = []

    def loglikelihood(self, reqs, batch_size=16, progress=True):
        self.calls.append(len(reqs))
        return [(self.fn(c, o), 1) for c, o in reqs]


SUITES = "implicatures,entailed_polarity,social_iqa,truthfulqa_mc"


def _run(fn, out, limit=12):
    return run_eval(
        "scripted",
        SUITES,
        limit=limit,
        out=out,
        lm=ScriptedLM(fn),
        data_dir=DATA,
        n_boot=200,
        progress=False,
        plots=False,
    )


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripted")
    tasks = load_tasks(SUITES, limit=12, data_dir=DATA)
    right = {
        join(it.prompt, it.options[i])
        for t in tasks
        for it in t.items
        if t.kind == "bigbench"
        for i in it.correct
    }
    right |= {
        join(it.prompt, o)
        for t in tasks
        if t.kind == "truthfulqa"
        for it in t.items
        for o, true in zip(it.mc2_options, it.mc2_true, strict=True)
        if true
    }

    def prior(continuation: str) -> float:  # the policy now likes "yes" (and some answers) more, everywhere
        word = continuation.strip()
        return 4.0 if word == "yes" else 0.6 * (len(word) % 3)

    return {
        "tasks": tasks,
        "base": _run(_noise, root / "base"),
        "prior": _run(lambda c, o: _noise(c, o) + prior(o), root / "prior"),
        "better": _run(lambda c, o: _noise(c, o) + (0.4 if (c, o) in right else 0.0), root / "better"),
        "root": root,
    }


def test_results_store_content_free_scores_and_both_probabilities(scripted):
    res = scripted["base"]
    assert res["format_version"] == 2
    t = res["timing"]
    tasks = scripted["tasks"]
    own = requests(tasks)
    assert t["content_free_options"] == len(content_free_requests(tasks, exclude=own))
    assert t["options_scored"] == len(own) + t["content_free_options"]
    assert t["content_free_prompts"] == 4  # one per task
    # stored values are the scripted log-likelihoods (rounded to 5 decimals), and the scores follow from them
    for name, entry in res["tasks"].items():
        (cf_prompt,) = entry["content_free_prompts"]
        item_by_id = {it.id: it for task in tasks if task.name == name for it in task.items}
        for row in entry["items"]:
            item = item_by_id[row["id"]]
            assert row["cf_ll"] == [round(_noise(*join(cf_prompt, o)), 5) for o in item.options]
            if entry["kind"] == "truthfulqa":
                ll, cf = row["mc2_ll"], row["mc2_cf_ll"]
                correct = [i for i, true in enumerate(row["mc2_true"]) if true]
                assert row["scores"]["p_correct"] == row["scores"]["mc2"]
            else:
                ll, cf, correct = row["ll"], row["cf_ll"], row["correct"]
            e = np.exp(np.subtract(ll, cf))
            # rounding each stored log-likelihood to 1e-5 moves a softmax mass by at most 2p(1-p)·1e-5 <= 5e-6
            assert row["scores"]["p_correct_cal"] == pytest.approx(e[correct].sum() / e.sum(), abs=5e-6)
            e = np.exp(ll)
            assert row["scores"]["p_correct"] == pytest.approx(e[correct].sum() / e.sum(), abs=5e-6)
        for m in ("p_correct", "p_correct_cal"):
            v = entry["metrics"][m]
            assert v["value"] == pytest.approx(np.mean([r["scores"][m] for r in entry["items"]]))
            assert v["ci_low"] <= v["value"] <= v["ci_high"] and v["n"] == 12
    rows = {r["row"]: r for r in res["summary"]}
    suite = rows["pragmatics (mean of 3 tasks)"]
    assert list(suite["metrics"]) == ["acc", "acc_norm", "p_correct", "p_correct_cal"]
    assert suite["metrics"]["p_correct_cal"]["value"] == pytest.approx(
        np.mean(
            [
                res["tasks"][n]["metrics"]["p_correct_cal"]["value"]
                for n in ("implicatures", "entailed_polarity", "social_iqa")
            ]
        )
    )
    report = (scripted["root"] / "base" / "report.md").read_text()
    assert (
        "p_correct_cal" in report
        and f"{t['content_free_options']} of them after 4 content-free prompts" in report
    )


def test_a_label_prior_shift_changes_accuracy_but_not_the_calibrated_score(scripted, tmp_path):
    cmp = compare(scripted["base"], scripted["prior"], names=["prior"], n_boot=200, n_perm=2000)
    by = {(r["row"], r["metric"]): r["models"]["prior"] for r in cmp["rows"]}
    imp_acc = by[("implicatures", "acc")]
    assert imp_acc["discordance"] > 0.2  # answers flipped to "yes" (to right or wrong: Δ acc may net out)
    options = {(t.name, it.id): it.options for t in scripted["tasks"] for it in t.items}
    for name in ("implicatures", "entailed_polarity"):  # the 4-nat prior beats any scripted difference (3.5)
        for row in scripted["prior"]["tasks"][name]["items"]:
            yes = options[(name, row["id"])].index("yes")
            assert int(np.argmax(row["ll"])) == yes and row["scores"]["acc"] == float(yes in row["correct"])
    for task in ("implicatures", "entailed_polarity", "social_iqa", "truthfulqa_mc"):
        cal = by[(task, "p_correct_cal")]
        assert cal["delta"] == pytest.approx(0.0, abs=1e-12) and cal["p"] == 1.0 and cal["n"] == 12
        moved = [
            abs(b["scores"]["p_correct"] - a["scores"]["p_correct"])
            for a, b in zip(
                scripted["base"]["tasks"][task]["items"],
                scripted["prior"]["tasks"][task]["items"],
                strict=True,
            )
        ]
        assert max(moved) > 0.05  # the uncalibrated probability moves item by item
    # per item, exactly: the prior cancels out of ll - cf
    for name, entry in scripted["base"]["tasks"].items():
        for a, b in zip(entry["items"], scripted["prior"]["tasks"][name]["items"], strict=True):
            assert b["scores"]["p_correct_cal"] == pytest.approx(a["scores"]["p_correct_cal"], abs=TOL)
    prag = by[("pragmatics (mean of 3 tasks)", "p_correct_cal")]
    assert prag["delta"] == pytest.approx(0.0, abs=1e-12)


def test_a_content_dependent_improvement_is_detected_and_claimed(scripted):
    cmp = compare(scripted["base"], scripted["better"], names=["context-reddit"], n_boot=200, n_perm=2000)
    by = {(r["row"], r["metric"]): r["models"]["context-reddit"] for r in cmp["rows"]}
    for task in ("implicatures", "entailed_polarity", "social_iqa", "truthfulqa_mc"):
        cal = by[(task, "p_correct_cal")]
        assert cal["delta"] > 0 and cal["ci_low"] > 0 and cal["p"] < 0.05
        assert cal["test"] == "paired permutation" and cal["mde_basis"].startswith(
            "paired t, observed sd(diff)"
        )
        # paired-t MDE from power.py with the observed sd of the per-item differences
        base = [it["scores"]["p_correct_cal"] for it in scripted["base"]["tasks"][task]["items"]]
        new = [it["scores"]["p_correct_cal"] for it in scripted["better"]["tasks"][task]["items"]]
        d = np.subtract(new, base)
        assert (d > 0).all() and cal["delta"] == pytest.approx(d.mean())
        from karma.eval.power import mde_paired

        assert cal["mde"] == pytest.approx(mde_paired(float(d.std(ddof=1)), 12))
    prag = by[("pragmatics (mean of 3 tasks)", "p_correct_cal")]
    assert prag["delta"] > 0 and prag["p"] < 0.05 and prag["n"] == 36
    assert prag["mde_basis"].startswith("mean of 3 task means, normal approx., observed sd(diff)")

    cfg = ExperimentConfig(
        data={"comments": ["x"]}, conditions={"reddit": "reddit"}, rm={"variants": ["context"]}
    )
    text = "\n".join(claims(cfg, {"context": {"systems": {}}}, cmp))
    acc = by[("pragmatics (mean of 3 tasks)", "acc")]

    def cell(c):
        disc = f", discordance {c['discordance']:.3f}" if c.get("discordance") is not None else ""
        mde = fmt_mde(c["mde"])
        star = "*" if c["p"] < 0.05 else ""
        return (
            f"{c['delta']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]{star} "
            f"(p={c['p']:.3g}, n={c['n']}, MDE {mde}{disc})"
        )

    assert f"- `context-reddit`: Δ p_correct_cal {cell(prag)}; beside it: acc {cell(acc)}" in text
    assert "Measured: pragmatics (mean of 3 tasks), the unweighted mean of the task means, per run Δ" in text
    assert (
        "**Reproduced** (calibrated P(correct) on pragmatics went up, p < 0.05, in all 1 runs) (MDE" in text
    )
    tqa = by[("truthfulqa_mc", "p_correct_cal")]
    mc1, mc2 = by[("truthfulqa_mc", "mc1")], by[("truthfulqa_mc", "mc2")]
    assert (
        f"- `context-reddit` truthfulqa_mc: Δ p_correct_cal {cell(tqa)}; beside it: mc1 {cell(mc1)}; "
        f"mc2 {cell(mc2)}"
    ) in text
    # the claim is a drop; this policy got better
    assert "### 5. Factuality drops in every condition" in text
    assert "TruthfulQA went down" not in text and "results format 1" not in text


def _as_format_1(results: dict, source: str) -> dict:
    """What `karma eval` wrote before calibration: no content-free scores, no p_correct / p_correct_cal."""
    out = copy.deepcopy(results)
    out.update(format_version=1, _source=source)
    out.pop("summary", None)
    for entry in out["tasks"].values():
        entry.pop("content_free_prompts", None)
        for m in ("p_correct", "p_correct_cal"):
            entry["metrics"].pop(m, None)
            entry["chance"].pop(m, None)
        for it in entry["items"]:
            for k in ("cf_ll", "mc2_cf_ll"):
                it.pop(k, None)
            for m in ("p_correct", "p_correct_cal"):
                it["scores"].pop(m, None)
    return out


def test_compare_refuses_to_pair_result_formats_and_still_reads_format_1(scripted, tmp_path):
    old = _as_format_1(scripted["base"], "runs/eval/base")
    new = {**scripted["better"], "_source": "runs/eval/ppo"}
    with pytest.raises(
        ValueError,
        match=r"results of different formats cannot be paired \(runs/eval/base: format 1, runs/eval/ppo: "
        r"format 2\); format 2 adds the content-free .* re-run `karma eval` for runs/eval/base",
    ):
        compare(old, new)
    # two format-1 runs still compare (accuracy, MC1, MC2), and the claims then decide on accuracy, saying so
    old_new = _as_format_1(scripted["better"], "runs/eval/ppo")
    cmp = compare(old, old_new, names=["context-reddit"], n_boot=100, n_perm=200)
    assert {r["metric"] for r in cmp["rows"]} == {"acc", "acc_norm", "mc1", "mc2"}
    cfg = ExperimentConfig(
        data={"comments": ["x"]}, conditions={"reddit": "reddit"}, rm={"variants": ["context"]}
    )
    text = "\n".join(claims(cfg, {"context": {"systems": {}}}, cmp))
    assert "- `context-reddit`: Δ pragmatics accuracy (mean over tasks)" in text
    assert (
        "(These results have no `p_correct_cal` (results format 1, before calibration): accuracy decides"
        in text
    )
    assert "- `context-reddit` truthfulqa_mc mc1:" in text
    future = tmp_path / "future"
    future.mkdir()
    (future / "results.json").write_text('{"format_version": 3, "tasks": {}}')
    with pytest.raises(ValueError, match="results format 3 is newer than this karma reads \\(2\\)"):
        load_results(future)
