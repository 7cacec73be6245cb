"""Data-parallel training (`services/policy_trainer/distributed.py`).

Fast: the pure pieces — contiguous shards, the batch-size rules per rank, the merge of the ranks' update
statistics, the launcher environment — and the row-seeded sampling that makes a rank's rollouts independent of
the other ranks' prompts (and still samples the policy's distribution).

Slow (`-m slow`; real `accelerate launch` processes, gloo on CPU, the tiny random Llama):
- 2 ranks x 2 steps equal one process over the same global batch (the same row-seeded layout), in float64:
  every metric within `METRIC_TOL`, every weight within `WEIGHT_TOL` (derived where they are defined);
- SIGKILL of rank 1 during step 2: the run exits non-zero within `KILL_DEADLINE_S` with `RankFailedError` on
  stderr and in trainer_result.json, leaving a checkpoint; `--resume` on 2 ranks finishes the run, equal to
  an uninterrupted one;
- a bad reward answer to one rank: every rank stops with `RewardUnavailableError` at the same point, with one
  checkpoint holding both ranks' RNG states.

`accelerate launch --cpu --num_processes 2` starts one process in accelerate 1.15 (several CPU processes need
mpirun), so the CPU runs here use `--multi_gpu` (torchrun) with no visible GPU: the trainer then picks gloo.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
import uuid
from pathlib import Path

import pytest
import torch

from services.policy_trainer.distributed import (
    Distributed,
    RankFailedError,
    check_batch_sizes,
    merge_stats,
    shard_bounds,
)
from services.policy_trainer.engines import HFEngine

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("timing/", "speed/")
#: 2 ranks and one process compute the same sums in other orders (each rank's reward model and policy forwards
#: see other batch compositions; gloo all-reduces the gradients), so their results differ by rounding, which
#: Adam amplifies: it divides each update by the running RMS of its gradient, so on a weight whose gradient is a
#: cancelling sum (|g| << sum of |terms|) a rounding difference of u * sum|terms| becomes a relative change of the
#: update itself. In float32 (unit roundoff u = 2^-24 = 6.0e-8) that reached 4e-6 on one x86-64 CPU and 2.9e-5 on
#: an AMD EPYC -- ~500 u, a figure of the CPU's kernels, not a bound. So these runs train in float64
#: (u = 2^-53 = 1.1e-16; policy, value head, reward model and rewards), where the same arithmetic gives ~500 u =
#: 6e-14 and 2-4e-16 was measured (AMD EPYC). WEIGHT_TOL = 1e-9 is 9e6 u: it holds on any IEEE-754 CPU (x86-64 or
#: ARM: every kernel rounds in float64 to within a few u per operation, and no amplification here approaches
#: 1e7), while any real difference between the layouts -- a gradient averaged over the wrong count, a rank's
#: share dropped or duplicated, another sample -- changes weights by the order of their update, lr x steps =
#: 2e-3, six orders of magnitude above it. The metrics are means over the same float64 values: METRIC_TOL
#: (1e-9 relative, 1e-12 absolute) has the same margin. The equality is a property of the layouts, tested where
#: rounding is bounded; the float32 2-rank path runs in the reward-failure test below.
METRIC_TOL = {"rel_tol": 1e-9, "abs_tol": 1e-12}
WEIGHT_TOL = 1e-9
KILL_DEADLINE_S = 120


# ============================================================================================ fast
def test_shards_are_contiguous_equal_and_cover_the_batch():
    assert [shard_bounds(8, r, 2) for r in range(2)] == [(0, 4), (4, 8)]
    assert [shard_bounds(6, r, 3) for r in range(3)] == [(0, 2), (2, 4), (4, 6)]
    assert shard_bounds(5, 0, 1) == (0, 5)
    with pytest.raises(ValueError, match="7 items cannot be split evenly across 2 ranks"):
        shard_bounds(7, 0, 2)


def test_each_rank_must_get_whole_micro_batches_of_every_minibatch():
    check_batch_sizes(8, 4, 2, 1)
    check_batch_sizes(8, 4, 2, 2)
    check_batch_sizes(8, 8, 1, 4)
    with pytest.raises(
        ValueError, match=r"rollout batch .* = 6\) must be divisible by the number of processes \(4\)"
    ):
        check_batch_sizes(6, 6, 1, 4)
    with pytest.raises(
        ValueError, match=r"mini_batch_size \(4\) must be divisible by the number of processes x "
    ):
        check_batch_sizes(8, 4, 4, 2)


def test_merged_statistics_are_the_mean_over_every_micro_batch():
    micro = [{"loss/policy": x, "policy/clipfrac": x / 10} for x in (0.5, -1.0, 2.0, 0.25)]
    one = {k: sum(m[k] for m in micro) for k in micro[0]}
    per_rank = [
        ({k: sum(m[k] for m in micro[:2]) for k in one}, 2),
        ({k: sum(m[k] for m in micro[2:]) for k in one}, 2),
    ]
    sums, n = merge_stats(per_rank)
    assert n == 4 and sums == pytest.approx(one)
    assert merge_stats([(one, 4)]) == (one, 4)  # one process: unchanged


def test_the_launcher_environment_places_the_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    alone = Distributed.from_env()
    assert (alone.rank, alone.world_size, alone.enabled, alone.parallel_layout, alone.is_main) == (
        0,
        1,
        False,
        False,
        True,
    )
    assert alone.shard(8) == (0, 8) and alone.any(True, "x") and alone.gather_objects(3, "x") == [3]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    d = Distributed.from_env()
    assert (d.rank, d.world_size, d.enabled, d.parallel_layout, d.is_main, d.device.type) == (
        2,
        4,
        True,
        True,
        False,
        "cpu",
    )
    assert d.shard(8) == (4, 6)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match=r"RANK=4 is not in \[0, WORLD_SIZE=4\)"):
        Distributed.from_env()


def _tiny_lm(vocab: int = 6):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    ).eval()


def test_row_seeded_rollouts_do_not_depend_on_the_other_rows_of_the_call():
    """The data-parallel layout: rows 0-3 generated together equal rows 0-1 and 2-3 generated apart (two
    ranks), padded to the same prompt width; the default one-stream sampling is not split-invariant."""
    engine = HFEngine(types.SimpleNamespace(lm=_tiny_lm()), types.SimpleNamespace(pad_token_id=0), {2})
    prompts = [[1, 3, 4], [1, 5], [4, 4, 3, 1], [5]]
    kw = {"seed": 11, "max_new_tokens": 12, "temperature": 1.0, "prompt_width": 4}
    whole = engine.generate(prompts, row_ids=[0, 1, 2, 3], **kw)
    halves = engine.generate(prompts[:2], row_ids=[0, 1], **kw) + engine.generate(
        prompts[2:], row_ids=[2, 3], **kw
    )
    assert [g.response_ids for g in halves] == [g.response_ids for g in whole]
    assert [g.ended_with_eos for g in halves] == [g.ended_with_eos for g in whole]
    again = engine.generate(prompts, row_ids=[0, 1, 2, 3], **(kw | {"seed": 12}))
    assert [g.response_ids for g in again] != [g.response_ids for g in whole]  # the seed matters


def test_row_seeded_sampling_draws_from_the_policy_distribution():
    """Gumbel-max per row is an exact sample of softmax(logits / T): first-token frequencies of 6000 rows
    match the model's probabilities (within 4.5 binomial standard deviations), at T = 1 and T = 0.5."""
    lm = _tiny_lm()
    engine = HFEngine(types.SimpleNamespace(lm=lm), types.SimpleNamespace(pad_token_id=0), {2})
    prompt, n = [1, 3, 4], 6000
    with torch.no_grad():
        logits = lm(torch.tensor([prompt])).logits[0, -1]
    for temperature in (1.0, 0.5):
        probs = torch.softmax(logits / temperature, -1)
        gens = engine.generate(
            [prompt] * n, seed=3, max_new_tokens=1, temperature=temperature, row_ids=list(range(n))
        )
        counts = torch.bincount(torch.tensor([g.response_ids[0] for g in gens]), minlength=len(probs)).float()
        sd = (n * probs * (1 - probs)).sqrt()
        assert ((counts - n * probs).abs() <= 4.5 * sd + 1).all(), (counts / n, probs)


def test_a_failed_collective_is_a_named_rank_failure():
    def fails(d: Distributed, message: str) -> None:
        with d.collective("all_gather"):
            raise RuntimeError(message)

    with pytest.raises(
        RankFailedError,
        match=r"^all_gather failed on rank 1 of 2: another rank died or did not "
        r"answer within 30s \(RuntimeError: Connection closed by peer\)$",
    ):
        fails(Distributed(rank=1, world_size=2, timeout_s=30), "Connection closed by peer\nmore lines")
    with pytest.raises(RuntimeError, match="^boom$"):  # one process: nothing to blame on other ranks
        fails(Distributed(), "boom")


# ============================================================================================ slow
def _config(root: Path, out: Path, dtype: str = "float64", **reward) -> dict:
    return {
        "model": {"policy": str(root / "policy"), "dtype": dtype},  # float64: see WEIGHT_TOL
        "data": {"prompts": f"file:{root / 'prompts.jsonl'}", "max_prompt_length": 64},
        "rollout": {"engine": "hf", "max_new_tokens": 10},
        "reward": reward or {"reward_model": str(root / "rm")},
        "ppo": {"prompts_per_step": 4, "mini_batch_size": 4, "micro_batch_size": 1, "learning_rate": 1e-3},
        "run": {
            "steps": 2,
            "output_dir": str(out),
            "save_every": 1,
            "report_to": ["jsonl"],
            "torch_threads": 1,
        },
        "eval": {"heldout_prompts": 0},
    }


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    from tests.support import make_tiny_causal_lm, make_tiny_rm

    root = tmp_path_factory.mktemp("ddp-assets")
    make_tiny_causal_lm(root / "policy")
    make_tiny_rm(root / "rm", "context")
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"question {i}: how do I pass exam {i}?"}) + "\n" for i in range(12))
    )
    return root


def _launch(config: dict, yaml_path: Path, *extra: str, tag: str = "") -> subprocess.Popen:
    """`accelerate launch` of `karma train` on 2 CPU ranks (gloo), its output captured."""
    from karma.net import free_port
    from services.policy_trainer.config import TrainConfig

    yaml_path.write_text(TrainConfig.from_dict(config).to_yaml())
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [
        "--main_process_port",
        str(free_port()),
        "-m",
        "karma.cli",
        "train",
        "--config",
        str(yaml_path),
        *extra,
    ]
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "KARMA_TEST_RUN": tag, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """(stdout, stderr) of a launch; whatever is left of it (launcher and ranks) is killed after `timeout`."""
    try:
        return proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launch's own process group (start_new_session)
        except ProcessLookupError:
            pass


def _reference(config: dict) -> None:
    """One process, the data-parallel (row-seeded) layout, in this process."""
    from services.policy_trainer.config import TrainConfig
    from services.policy_trainer.trainer import Trainer

    trainer = Trainer(TrainConfig.from_dict(config), dist=Distributed(row_seeded=True))
    try:
        trainer.fit()
    finally:
        trainer.close()


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _assert_same_run(a: Path, b: Path) -> float:
    """Rows and final weights of two runs agree within the tolerances; returns the largest weight difference."""
    from safetensors.torch import load_file

    rows_a, rows_b = _rows(a), _rows(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra.keys() == rb.keys()
        for k, v in ra.items():
            if isinstance(v, float):
                assert math.isclose(v, rb[k], **METRIC_TOL), (ra["step"], k, v, rb[k])
            else:
                assert v == rb[k], (ra["step"], k, v, rb[k])
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= WEIGHT_TOL, worst
    return worst


@pytest.mark.slow
@pytest.mark.parametrize(
    "ppo",
    [
        {},  # ppo: GAE over the values, advantages whitened over the whole batch
        {"algo": "rloo", "prompts_per_step": 1, "samples_per_prompt": 4},  # the one group split across ranks
    ],
    ids=["ppo", "rloo-split-group"],
)
def test_two_ranks_equal_one_process_over_the_same_global_batch(assets, tmp_path, ppo):
    from safetensors.torch import load_file

    ddp, one = tmp_path / "ddp", tmp_path / "one"
    configs = [_config(assets, out) for out in (ddp, one)]
    for cfg in configs:
        cfg["ppo"] |= ppo
    proc = _launch(configs[0], tmp_path / "ddp.yaml")
    try:
        _reference(configs[1])  # meanwhile, in this process
    finally:
        stdout, stderr = _finish(proc, 300)
    assert proc.returncode == 0, stderr[-4000:]
    assert "data-parallel: 2 processes (gloo" in stderr
    assert stdout.count("completed at step 2") >= 1
    _assert_same_run(one, ddp)
    start = load_file(assets / "policy" / "model.safetensors")
    trained = load_file(ddp / "model.safetensors")
    assert all(not torch.equal(start[k], trained[k]) for k in start)  # every weight moved
    state = torch.load(ddp / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2


class FakeRewards:
    """A fake reward service (the real wire protocol): score = words / 10. Once `after` exists on disk (rank 0
    wrote step 1's checkpoint) it either holds requests until `release` is set (`held` says one waits), or
    answers the first request with a body that has no `version` (a bad answer: that rank's step fails)."""

    def __init__(self, after: Path, action: str):
        self.after, self.action = after, action
        self.held, self.release, self.failed = threading.Event(), threading.Event(), threading.Event()

    def app(self):
        from fastapi import FastAPI

        app = FastAPI()

        @app.get("/ready")
        def ready() -> dict:
            return {"status": "ready"}

        @app.post("/v1/score")
        def score(body: dict) -> dict:  # a plain def: runs in a worker thread, so waiting blocks nothing
            scores = [len(it["response"].split()) / 10 for it in body["items"]]
            reply = {"model": "fake", "version": "v1", "scores": scores, "truncated": [False] * len(scores)}
            if self.after.exists() and self.action == "hold" and not self.release.is_set():
                self.held.set()
                self.release.wait(60)
            if self.after.exists() and self.action == "fail_once" and not self.failed.is_set():
                self.failed.set()
                del reply["version"]
            return reply

        return app


def _rank_pid(tag: str, rank: int) -> int:
    """The pid of the worker of launch `tag` that has RANK=`rank` (read from /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if env.get("KARMA_TEST_RUN") == tag and env.get("RANK") == str(rank):
            return int(proc.name)
    raise LookupError(f"no rank {rank} of launch {tag}")


@pytest.mark.slow
def test_killing_a_rank_stops_the_run_with_a_named_error_and_resume_finishes_it(assets, tmp_path):
    from tests.support import serve_in_thread

    out = tmp_path / "run"
    gate = FakeRewards(out / "checkpoints" / "step-000001", "hold")
    with serve_in_thread(gate.app()) as url:
        cfg = _config(assets, out, reward_url=[url])
        tag = uuid.uuid4().hex
        proc = _launch(cfg, tmp_path / "run.yaml", tag=tag)
        try:
            deadline = time.monotonic() + 180
            while not gate.held.wait(0.5) and proc.poll() is None and time.monotonic() < deadline:
                pass
            assert gate.held.is_set(), f"step 2 never asked for rewards: {proc.poll()} {_finish(proc, 1)}"
            os.kill(_rank_pid(tag, 1), signal.SIGKILL)  # rank 1 dies in step 2
            killed = time.monotonic()
            time.sleep(1.0)
        finally:
            gate.release.set()
            _, stderr = _finish(proc, KILL_DEADLINE_S)
        assert time.monotonic() - killed < KILL_DEADLINE_S
        assert proc.returncode != 0
        assert "RankFailedError" in stderr and "another rank died" in stderr, stderr[-4000:]
        result = json.loads((out / "trainer_result.json").read_text())
        assert (result["status"], result["error_type"], result["step"]) == ("failed", "RankFailedError", 1), (
            result
        )
        assert "training stopped before step 2; checkpoint saved to" in result["error"], result
        assert result["checkpoint"].endswith("step-000001"), result
        assert [r["step"] for r in _rows(out)] == [1]

        resumed = _launch(cfg, tmp_path / "run.yaml", "--resume", tag=tag)
        _, stderr = _finish(resumed, 300)
        assert resumed.returncode == 0, stderr[-4000:]
        assert (
            "resumed from" in stderr
            and json.loads((out / "trainer_result.json").read_text())["status"] == "completed"
        )

        whole = tmp_path / "whole"
        _reference(_config(assets, whole, reward_url=[url]))
    _assert_same_run(whole, out)


@pytest.mark.slow
def test_a_reward_failure_on_one_rank_stops_every_rank_at_the_same_point(assets, tmp_path):
    from tests.support import serve_in_thread

    out = tmp_path / "run"
    service = FakeRewards(out / "checkpoints" / "step-000001", "fail_once")
    with serve_in_thread(service.app()) as url:
        # float32, the default users train in: the 2-rank path runs there too (no equality asserted)
        proc = _launch(_config(assets, out, "float32", reward_url=[url]), tmp_path / "run.yaml")
        _, stderr = _finish(proc, 300)
    assert service.failed.is_set() and proc.returncode != 0, stderr[-4000:]
    assert re.search(r"karma train: RewardUnavailableError: rank [01]: .*no 'version'", stderr), stderr[
        -4000:
    ]
    assert stderr.count("karma train: RewardUnavailableError: rank") == 2  # both ranks stop with it
    result = json.loads((out / "trainer_result.json").read_text())
    assert (result["status"], result["error_type"], result["step"]) == ("failed", "RewardUnavailableError", 1)
    assert "training stopped before step 2; checkpoint saved to" in result["error"], result
    state = torch.load(out / "checkpoints" / "step-000001" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 1 and len(state["rng_ranks"]) == 2  # saved with both ranks' RNG states
