"""`karma eval` on tiny random Llamas (SmolLM2's tokenizer): the batched scorer against the unbatched one and
a plain forward pass, model checks before loading, results.json / report.md / plots, LoRA folders, the reward
service's score of generated replies, `compare`, and the CLI."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from karma.eval import compare, run_eval
from karma.eval import metrics as M
from karma.eval import power as P
from karma.eval.run import check_reward_service
from karma.eval.scoring import CausalLM, NotACausalLMError, inspect_model
from karma.eval.tasks import (
    TaskSchemaError,
    UnknownSuiteError,
    content_free_requests,
    join,
    load_tasks,
    requests,
)
from karma.paths import shared_data_dir
from tests.support import cli_text, make_tiny_causal_lm

DATA = shared_data_dir()
SMALL = "implicatures,hhh_alignment/harmless,truthfulqa_mc,metaphor_understanding,known_unknowns"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lms")
    base = make_tiny_causal_lm(root / "base", seed=0)
    return {"base": base, "lora": make_tiny_causal_lm(root / "lora", seed=1, lora_of=base)}


@pytest.fixture(scope="module")
def lm(models) -> CausalLM:
    return CausalLM.load(str(models["base"]))


def reference_loglik(lm: CausalLM, context: str, continuation: str) -> float:
    """One unpadded forward pass over context + continuation, summing the continuation's log-probs."""
    import torch

    ctx, cont = lm.encode_pair(context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(ids).logits[0, :-1].float(), dim=-1)
    return float(logprobs[len(ctx) - 1 :].gather(-1, ids[0, len(ctx) :, None]).sum())


def reference_loglik_of_ids(lm: CausalLM, pair: tuple[list[int], list[int]], max_length: int) -> float:
    """The same, for a (context ids, continuation ids) pair cut from the left to max_length + 1 tokens."""
    import torch

    ctx, cont = pair
    ids = torch.tensor([(ctx + cont)[-(max_length + 1) :]])
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(ids[:, :-1]).logits[0].float(), dim=-1)
    return float(logprobs[-len(cont) :].gather(-1, ids[0, -len(cont) :, None]).sum())


# ------------------------------------------------------------------------------------ scorer
def test_batched_scorer_equals_unbatched_and_a_plain_forward(lm):
    tasks = load_tasks(SMALL, limit=2, data_dir=DATA)
    reqs = requests(tasks)
    lengths = [len(c) + len(o) for c, o in reqs]
    assert max(lengths) > 3 * min(lengths)  # a mix of short and long rows in the same batches
    batched = lm.loglikelihood(reqs, batch_size=16, progress=False)  # shared prefix (KV cache), batched
    pairs = lm.loglikelihood(
        reqs, batch_size=7, share_prefix=False, progress=False
    )  # one padded row per pair
    single = lm.loglikelihood(reqs, batch_size=1, share_prefix=False, progress=False)  # unbatched
    b, p, s = (np.array([x[0] for x in r]) for r in (batched, pairs, single))
    assert b == pytest.approx(s, rel=1e-5, abs=1e-4)  # float32 sums of up to ~100 token log-probs
    assert p == pytest.approx(s, rel=1e-5, abs=1e-4)
    assert [x[1] for x in batched] == [x[1] for x in single] == [x[1] for x in pairs]
    assert min(x[1] for x in batched) == 1 and max(x[1] for x in batched) > 20  # one-token and long options
    ref = np.array([reference_loglik(lm, c, o) for c, o in reqs[:12]])
    assert b[:12] == pytest.approx(ref, rel=1e-5, abs=1e-4)
    assert len(set(np.round(b, 3))) > len(b) // 2  # the options really get different scores


def test_encode_pair_moves_trailing_whitespace_into_the_continuation(lm):
    tok = lm.tokenizer
    ctx, cont = lm.encode_pair("Q: is it?\nA: ", "yes")
    assert tok.decode(ctx) == "Q: is it?\nA:" and tok.decode(cont) == " yes"
    ctx, cont = lm.encode_pair("", "hello")
    assert ctx == [tok.bos_token_id] and tok.decode(cont) == "hello"


def test_long_contexts_are_cut_from_the_left(models):
    short = CausalLM.load(str(models["base"]))
    short.max_length = 16
    for share in (True, False):
        ((ll, n),) = short.loglikelihood([("word " * 100, "end")], share_prefix=share, progress=False)
        assert n == len(short.encode_pair("word " * 100, "end")[1]) and np.isfinite(ll)
        assert ll == pytest.approx(
            reference_loglik_of_ids(short, short.encode_pair("word " * 100, "end"), 16)
        )


# ------------------------------------------------------------------------------------ model checks
def test_not_a_causal_lm_is_refused_from_its_config(tmp_path):
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text(
        json.dumps({"architectures": ["BertForSequenceClassification"], "model_type": "bert"})
    )
    with pytest.raises(
        NotACausalLMError,
        match=r"rm is not a causal LM: config.json lists architectures "
        r"\['BertForSequenceClassification'\] \(model_type 'bert'\)",
    ):
        inspect_model(str(rm))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotACausalLMError, match="empty is not a causal LM folder"):
        inspect_model(str(empty))
    adapter = tmp_path / "cls_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"task_type": "SEQ_CLS", "base_model_name_or_path": str(rm)})
    )
    with pytest.raises(NotACausalLMError, match="PEFT adapter for task 'SEQ_CLS'"):
        inspect_model(str(adapter))


def test_lora_folder_resolves_to_its_base(models):
    spec = inspect_model(str(models["lora"]))
    assert spec.is_adapter and spec.base == str(models["base"].resolve())
    assert spec.architectures == ("LlamaForCausalLM",)


async def _fast_ready(url, api_key, model):
    await check_reward_service(url, api_key, model, deadline_s=1.0)


def test_bad_input_fails_before_any_model_loads(models, tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(CausalLM, "load", no_load)
    with pytest.raises(UnknownSuiteError, match="unknown suite or task 'pragmatix'"):
        run_eval(str(models["base"]), "pragmatix", out=tmp_path / "o", data_dir=DATA)
    bad = tmp_path / "data"
    task = bad / "eval" / "bigbench" / "implicatures" / "task.json"
    task.parent.mkdir(parents=True)
    task.write_text(json.dumps({"examples": [{"input": "x", "target": "y"}]}))
    with pytest.raises(TaskSchemaError, match=f"{task}: example 0: generative"):
        run_eval(str(models["base"]), "implicatures", out=tmp_path / "o", data_dir=bad)
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text('{"architectures": ["BertModel"]}')
    with pytest.raises(NotACausalLMError, match="is not a causal LM"):
        run_eval(str(tmp_path / "rm"), "implicatures", out=tmp_path / "o", data_dir=DATA)
    from karma.client import RewardServiceError
    from karma.net import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RewardServiceError, match="not ready before the deadline"):
        asyncio.run(check_reward_service(dead, None, None, deadline_s=1.0))
    monkeypatch.setattr("karma.eval.run.check_reward_service", _fast_ready)
    with pytest.raises(RewardServiceError, match=f"not ready before the deadline: {dead}"):
        run_eval(str(models["base"]), "generation", out=tmp_path / "o", data_dir=DATA, reward_url=dead)
    assert not (tmp_path / "o" / "results.json").exists()


# ------------------------------------------------------------------------------------ run_eval / compare
@pytest.fixture(scope="module")
def runs(models, lm, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    common = {
        "limit": 4,
        "data_dir": DATA,
        "n_prompts": 4,
        "max_new_tokens": 6,
        "n_boot": 200,
        "progress": False,
        "batch_size": 8,
    }
    suites = "implicatures,metaphor_understanding,generation,truthfulqa_mc,known_unknowns"
    run_eval(str(models["base"]), suites, out=root / "base", lm=lm, **common)
    run_eval(str(models["lora"]), suites, out=root / "lora", **common)
    return {"base": root / "base", "lora": root / "lora"}


def test_results_json_holds_items_metrics_and_cis(runs, lm):
    res = json.loads((runs["base"] / "results.json").read_text())
    tasks = res["tasks"]
    assert list(tasks) == [
        "implicatures",
        "metaphor_understanding/lit2met",
        "metaphor_understanding/met2lit",
        "generation",
        "truthfulqa_mc",
        "known_unknowns",
    ]
    for t in tasks.values():
        assert t["n"] == 4 and len(t["items"]) == 4
        for m, v in t["metrics"].items():
            assert v["n"] == 4 and v["ci_low"] <= v["value"] <= v["ci_high"]
            if m not in M.CORPUS_METRICS:
                assert v["value"] == pytest.approx(np.mean([it["scores"][m] for it in t["items"]]))
    for it in tasks["implicatures"]["items"]:
        acc = M.mc_scores(it["ll"], [len(o) for o in ("yes", "no")], set(it["correct"]))
        assert {k: it["scores"][k] for k in acc} == acc
    for it in tasks["truthfulqa_mc"]["items"]:
        assert it["scores"]["mc1"] == M.mc1(it["ll"], it["correct"][0])
        assert it["scores"]["mc2"] == pytest.approx(M.mc2(it["mc2_ll"], it["mc2_true"]), abs=1e-4)
    # calibration: every option also scored after its task's content-free prompt, once per (prompt, option)
    (cf_prompt,) = tasks["implicatures"]["content_free_prompts"]
    cf_ref = [reference_loglik(lm, *join(cf_prompt, o)) for o in ("yes", "no")]
    for name, t in tasks.items():
        if t["kind"] == "generation":
            continue
        for it in t["items"]:
            if name == "implicatures":
                assert it["cf_ll"] == pytest.approx(cf_ref, rel=1e-5, abs=1e-4)
            ll, cf, correct = (
                (it["mc2_ll"], it["mc2_cf_ll"], [i for i, x in enumerate(it["mc2_true"]) if x])
                if t["kind"] == "truthfulqa"
                else (it["ll"], it["cf_ll"], it["correct"])
            )
            # stored log-likelihoods are rounded to 1e-5, which moves a softmax mass by at most 5e-6
            assert it["scores"]["p_correct"] == pytest.approx(M.p_correct(ll, correct), abs=5e-6)
            assert it["scores"]["p_correct_cal"] == pytest.approx(M.p_correct(ll, correct, cf), abs=5e-6)
    mc_tasks = load_tasks(
        "implicatures,metaphor_understanding,truthfulqa_mc,known_unknowns", limit=4, data_dir=DATA
    )
    assert res["timing"]["content_free_options"] == len(
        content_free_requests(mc_tasks, exclude=requests(mc_tasks))
    )
    assert res["timing"]["options_scored"] == len(requests(mc_tasks)) + res["timing"]["content_free_options"]
    gen = tasks["generation"]
    assert set(gen["metrics"]) == {"length_words", "length_tokens", "rep_4", "distinct_1", "distinct_2"}
    assert gen["metrics"]["distinct_1"]["value"] == M.distinct_n([it["reply"] for it in gen["items"]], 1)
    assert all(0 < it["scores"]["length_tokens"] <= 6 for it in gen["items"])
    rows = {r["row"]: r for r in res["summary"]}
    fam = rows["metaphor_understanding"]
    assert fam["kind"] == "family" and fam["metrics"]["acc"]["n"] == 8
    assert fam["metrics"]["acc"]["value"] == pytest.approx(
        (
            tasks["metaphor_understanding/lit2met"]["metrics"]["acc"]["value"]
            + tasks["metaphor_understanding/met2lit"]["metrics"]["acc"]["value"]
        )
        / 2
    )
    suite = rows["pragmatics (mean of 2 tasks)"]
    assert suite["metrics"]["acc"]["value"] == pytest.approx(
        (tasks["implicatures"]["metrics"]["acc"]["value"] + fam["metrics"]["acc"]["value"]) / 2
    )
    assert res["timing"]["options_scored"] > 0 and res["settings"]["mc_chat_template"] is False
    assert res["model"]["base"] is None
    lora = json.loads((runs["lora"] / "results.json").read_text())
    assert lora["model"]["base"] is not None
    assert lora["tasks"]["implicatures"]["items"][0]["ll"] != tasks["implicatures"]["items"][0]["ll"]


def test_report_and_plots_are_written(runs):
    report = (runs["base"] / "report.md").read_text()
    assert "| implicatures | 4 | 0.500 |" in report and "## factuality" in report and "mc2" in report
    assert "no reward service given" in report
    for png in ("mc_tasks.png", "generation.png"):
        assert (runs["base"] / png).read_bytes()[:4] == b"\x89PNG"


def test_compare_pairs_items_and_reports_deltas(runs, tmp_path):
    out = tmp_path / "cmp"
    result = compare(runs["base"], runs["lora"], out=out, n_boot=200, n_perm=500)
    base = json.loads((runs["base"] / "results.json").read_text())["tasks"]
    lora = json.loads((runs["lora"] / "results.json").read_text())["tasks"]
    by = {(r["row"], r["metric"]): r["models"]["lora"] for r in result["rows"]}
    for task, metric in [("implicatures", "acc"), ("truthfulqa_mc", "mc2"), ("generation", "length_tokens")]:
        c = by[(task, metric)]
        expected = np.mean([it["scores"][metric] for it in lora[task]["items"]]) - np.mean(
            [it["scores"][metric] for it in base[task]["items"]]
        )
        assert c["delta"] == pytest.approx(expected) and c["n"] == 4
        assert c["ci_low"] <= c["delta"] + 1e-9 and c["delta"] <= c["ci_high"] + 1e-9 and 0 < c["p"] <= 1
    cal = by[("pragmatics (mean of 2 tasks)", "p_correct_cal")]
    assert cal["test"] == "paired permutation" and cal["n"] == 12
    assert cal["mde_basis"].startswith("mean of 2 task means, normal approx., observed sd(diff)")
    assert by[("implicatures", "acc")]["test"] == "McNemar exact"
    assert by[("truthfulqa_mc", "mc2")]["test"] == "paired permutation"
    assert ("pragmatics (mean of 2 tasks)", "acc_norm") in by and ("generation", "distinct_2") in by
    # every cell carries the MDE of its test; 4 paired items can never reach p < 0.05 (∞), 12 in the suite can
    imp = by[("implicatures", "acc")]
    b_acc = [it["scores"]["acc"] for it in base["implicatures"]["items"]]
    l_acc = [it["scores"]["acc"] for it in lora["implicatures"]["items"]]
    assert imp["discordance"] == P.discordance(b_acc, l_acc) and imp["mde"] == math.inf
    assert by[("truthfulqa_mc", "mc2")]["mde_basis"] == "paired permutation: 4 pairs can never give p < 0.05"
    assert by[("generation", "distinct_2")]["mde"] == math.inf
    suite = by[("pragmatics (mean of 2 tasks)", "acc")]
    fam = [
        (it["scores"]["acc"], o["scores"]["acc"])
        for t in ("metaphor_understanding/lit2met", "metaphor_understanding/met2lit")
        for it, o in zip(base[t]["items"], lora[t]["items"], strict=True)
    ]
    expected = P.suite_mde([(b_acc, l_acc), ([b for b, _ in fam], [o for _, o in fam])], binary=True)
    assert suite["mde"] == pytest.approx(expected["mde"]) and suite["mde_basis"].startswith(
        "mean of 2 task means"
    )
    table = (out / "compare.md").read_text()
    assert "| pragmatics | implicatures | acc | 4 |" in table and "Δ lora [95% CI] | p | MDE |" in table
    assert f"| {imp['p']:.3f} | ∞ |" in table
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "compare.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))


def test_compare_drops_items_whose_prompt_changed(runs, tmp_path):
    base = json.loads((runs["base"] / "results.json").read_text())
    other = json.loads((runs["lora"] / "results.json").read_text())
    other["tasks"]["implicatures"]["items"][0]["key"] = "something-else"
    del other["tasks"]["implicatures"]["items"][1]
    result = compare(base, other, names=["edited"], n_boot=100, n_perm=100)
    row = next(r for r in result["rows"] if r["row"] == "implicatures" and r["metric"] == "acc")
    assert row["models"]["edited"]["n"] == 2 and row["models"]["edited"]["mismatched_items"] == 1
    with pytest.raises(ValueError, match="at least one trained"):
        compare(base)
    with pytest.raises(FileNotFoundError, match="no results.json"):
        compare(base, tmp_path)


# ------------------------------------------------------------------------------------ reward service
def test_generated_replies_are_scored_by_the_reward_service(lm, tmp_path):
    from karma.rm.model import RewardModel, RMInput
    from services.reward_api.core.config import Settings
    from services.reward_api.main import create_app
    from tests.support import make_tiny_rm, serve_in_thread

    rm_path = make_tiny_rm(tmp_path / "rm", "context", seed=3)
    prompts = ["Could you please review my edit?", "Why was my question closed?", "Can you help me?"]
    with serve_in_thread(create_app(Settings(models={"tiny": str(rm_path)}))) as url:
        res = run_eval(
            "tiny",
            "generation",
            out=tmp_path / "o",
            reward_url=url,
            prompts=prompts,
            lm=lm,
            data_dir=DATA,
            max_new_tokens=5,
            temperature=1.0,
            top_p=1.0,
            n_boot=100,
            progress=False,
        )
    gen = res["tasks"]["generation"]
    expected = RewardModel.load(rm_path).score(
        [RMInput(p, it["reply"]) for p, it in zip(prompts, gen["items"], strict=True)]
    )
    assert [it["scores"]["reward"] for it in gen["items"]] == pytest.approx(expected, abs=1e-4)
    assert gen["metrics"]["reward"]["value"] == pytest.approx(np.mean(expected), abs=1e-4)
    assert gen["reward_model"]["url"] == url and gen["reward_model"]["version"]
    assert "reward service `" in (tmp_path / "o" / "report.md").read_text()


# ------------------------------------------------------------------------------------ CLI
def test_cli_eval_and_compare(runs, models, tmp_path):
    from karma.cli import app

    runner = CliRunner()
    r = runner.invoke(
        app, ["eval", "--model", str(models["base"]), "--suite", "nope", "--out", str(tmp_path / "x")]
    )
    assert r.exit_code == 2 and "unknown suite or task 'nope'; valid suites: pragmatics" in r.output
    r = runner.invoke(app, ["eval", "--model", str(models["base"])])
    assert r.exit_code == 2 and "--out DIR is required" in r.output
    r = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tmp_path),
            "--suite",
            "implicatures",
            "--out",
            str(tmp_path / "x"),
            "--data-dir",
            str(DATA),
        ],
    )
    assert r.exit_code == 2 and "is not a causal LM folder" in r.output
    r = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(models["base"]),
            "--suite",
            "entailed_polarity",
            "--limit",
            "2",
            "--out",
            str(tmp_path / "cli"),
            "--data-dir",
            str(DATA),
            "--no-progress",
            "--n-boot",
            "100",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "entailed_polarity" in r.output and (tmp_path / "cli" / "results.json").exists()
    # --task PATH: a BIG-bench task file / folder by path, alone or beside --suite; --task-limit per task
    snarks = tmp_path / "snarks"
    snarks.mkdir()
    (snarks / "task.json").write_text(
        json.dumps(
            {
                "examples": [
                    {"input": f"Q{i}: Oh great, rain again.", "target_scores": {"sarcastic": 1, "sincere": 0}}
                    for i in range(6)
                ]
            }
        )
    )
    r = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(models["base"]),
            "--task",
            str(snarks),
            "--task-limit",
            "snarks=3",
            "--out",
            str(tmp_path / "snarks_out"),
            "--no-progress",
            "--n-boot",
            "100",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "snarks_out" / "results.json").read_text())
    assert list(res["tasks"]) == ["snarks"] and res["tasks"]["snarks"]["n"] == 3
    assert res["tasks"]["snarks"]["suite"] == "custom" and res["settings"]["task_paths"] == [str(snarks)]
    for args, message in [
        (
            ["--task", str(tmp_path / "missing")],
            f"error: --task {tmp_path / 'missing'}: no such file or folder",
        ),
        (["--task", str(tmp_path / "bad.json")], f"error: {tmp_path / 'bad.json'}: not valid JSON"),
        (
            ["--task", str(snarks), "--task-limit", "snarks"],
            "task_limits: --task-limit 'snarks': expected NAME=N (N >= 1) or NAME=all (from flag --task-limit)",
        ),
        (
            ["--task", str(snarks), "--task-limit", "sarcasm=2"],
            "error: task_limits: 'sarcasm' not among the selected",
        ),
    ]:
        (tmp_path / "bad.json").write_text("{not json")
        r = runner.invoke(app, ["eval", "--model", str(models["base"]), *args, "--out", str(tmp_path / "x")])
        assert r.exit_code == 2 and message in cli_text(r.output), r.output
    r = runner.invoke(
        app,
        [
            "eval",
            "compare",
            str(runs["base"]),
            str(runs["lora"]),
            "--out",
            str(tmp_path / "c"),
            "--name",
            "adapter",
            "--n-perm",
            "200",
            "--n-boot",
            "100",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "Δ adapter [95% CI]" in r.output and (tmp_path / "c" / "compare.png").exists()
