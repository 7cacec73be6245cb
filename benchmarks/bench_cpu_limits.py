"""The machine's limit, measured: three ratios of `karma demo`'s work to this machine's own limits, all in one
process, with torch threads = `karma.threads.worker_threads(--threads)` set before anything starts (vLLM makes
`torch.set_num_threads` a no-op once it has started).

    .venv/bin/python benchmarks/bench_cpu_limits.py --json /tmp/bench_cpu_limits.json
    .venv/bin/python benchmarks/bench_cpu_limits.py --prompts reddit:runs/demo/data --steps 3 --eval-limit 10

Defaults are the `karma demo` settings (karma/configs/experiment_demo.yaml): SmolLM2-135M-Instruct (fp32),
vLLM rollouts (transformers `generate` when vLLM is not importable: the script says so), 8 prompts x 32 new
tokens a step, prompts cut to 64 tokens, LoRA with gradient checkpointing, minibatch 8, micro-batch 4, 1 epoch,
lr 1e-4, eager vLLM for 16 sequences with a 0.1 GiB KV cache; the reward is a MiniLM
`context` RM with an untrained head (its cost is a trained one's) in this process (`LocalRewardSource`).
Prompts: `--prompts reddit:DIR` (a `karma data prepare` folder) or, by default, 64 built-in r/college-style
posts, so the script runs without prepared data.

1. Matmul baseline: FLOP/s of a plain fp32 `torch.mm` on the policy's own shapes, (512 x hidden) @
   (hidden x intermediate) and (512 x hidden) @ (hidden x vocab), each repeated for >= `--matmul-s` seconds
   after a warm-up. Their combination is FLOP-weighted by what one token spends in each kind (the body's
   matmul parameters Nb vs the LM head's Nh): (Nb + Nh) / (Nb / r_body + Nh / r_head), i.e. the rate of a
   token's work if each kind ran at its own measured rate. Measured after set-up (the reference) and again
   at the end (a drift check on a shared machine).
2. PPO step: a `Trainer` (one warm-up step, then `--steps` timed `train_step()`s). Each step's FLOPs are
   counted from its real token counts (p_i prompt and r_i response tokens of sequence i, read from the
   step's batch: prompt part of `attention_mask`, `response_mask`), with Nb = every `nn.Linear` weight of
   the LM but the output embedding, Nh = the LM head (vocab x hidden; tied to the input embedding, counted
   once, as a matmul; the embedding lookup is free), Nv = the value head (hidden):
       rollout   sum_i 2 Nb (p_i + r_i - 1) + 2 Nh r_i     prefill of the prompt, one forward per generated
                                                          token but the last; logits for the r_i sampled ones
       logprobs  sum_i 2 (2 Nb (p_i + r_i) + 2 Nh r_i) + 2 Nv r_i   policy (+ values) and reference forward
       update    epochs x sum_i 6 (Nb (p_i + r_i) + (Nh + Nv) r_i)  forward + backward = 3 forwards
   The head counts only where the trainer computes logits (`logits_to_keep`: the response positions), and
   padding counts for nothing (it is part of the gap). `flops_head_every_token` is the cruder count that
   charges 2 (Nb + Nh + Nv) to every token (p_i + r_i) of every forward, prompt tokens included:
   (1 + 2 + 3 epochs) forwards' worth; its ratio is in the JSON beside. Not counted: attention's quadratic term (~ n_layers * hidden * L / Nb of a forward of L tokens:
   a few % at L ~ 200; estimated in the JSON), layer norms, activations, softmax, the optimizer.
   Ratio 1 = counted FLOPs / step wall time / the matmul baseline (goal >= 0.35); per phase likewise.
3. Evaluation: exactly the multiple-choice requests `run_eval` scores for the demo's eval settings (suites
   pragmatics,side_effects,factuality, `--eval-limit` items a task; the items' own pairs and the content-free
   ones), `CausalLM.loglikelihood(reqs, batch_size=16)` -> options/s, against a raw batched forward of the
   same model over the same tokens: the scorer's shared-prefix plan, pre-tokenised (each distinct context
   once, cut, sorted and left-padded into the same batches of 16, logits for the last position only; then
   each multi-token option's tokens but the last, in the same right-padded batches of 16 with the same
   position ids, all logits), plain `model(...)` under inference_mode with no KV cache. "The same tokens":
   same ids, batches and padding; the raw option forwards do not attend to a cached context (the scorer's
   do: a little more work for it), and the raw pass has no tokenising, cache copies or log-softmax.
   Ratio 2 = eval options/s / raw options/s (goal >= 0.8).
4. Held-out generation: the trained policy's held-out replies for `--heldout` prompts exactly as a run
   makes them (`heldout.engine_replies`: `batched_replies` in batches of `eval.heldout_batch_size`, row-
   seeded), tokens/s, against one `engine.generate` of all of them (same engine, prompts, length,
   temperature 1). Ratio 3 = held-out tok/s / one-batch tok/s (goal >= 0.8). Held-out prompts: the val
   split with `reddit:DIR`, else the training prompts (cycled when fewer).

Smoke run on tiny random models (seconds): `--policy DIR --rm DIR --engine hf --eval-limit 1 --heldout 4
--steps 1 --matmul-s 0.2`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# 64 r/college-style posts (title + a short body), the prompts when no prepared data folder is given
BUILTIN_PROMPTS = [
    (
        "Is it worth switching majors in junior year?",
        "I'm a CS major but I like economics more. Would it delay graduation too much?",
    ),
    (
        "How do you actually make friends as a commuter student?",
        "I drive in for class and leave. Everyone seems to have their groups already.",
    ),
    (
        "Professor hasn't posted grades and the deadline is tomorrow",
        "Should I email the department or just wait it out?",
    ),
    (
        "Roommate keeps having people over every night",
        "I have 8am classes. How do I bring it up without making it weird?",
    ),
    (
        "Anyone regret taking a gap year?",
        "Thinking about working for a year before transferring. Did it hurt or help you?",
    ),
    (
        "How many hours a week do you study?",
        "I'm doing maybe 10 outside of class and I'm wondering if that's way too low.",
    ),
    ("Failed my first midterm, what now?", "Got a 48 in orgo. The class is curved but I'm panicking."),
    ("Is a minor worth it?", "Considering a stats minor on top of biology. Would employers care at all?"),
    (
        "Best way to ask for a letter of recommendation?",
        "I only talked to this professor in office hours twice.",
    ),
    (
        "Dining hall food is making me sick",
        "Every week something upsets my stomach. Is it worth getting off the meal plan?",
    ),
    ("Should I take 18 credits next semester?", "I want to graduate early but I also work 15 hours a week."),
    (
        "How do you deal with group projects where nobody does anything?",
        "It's week 6 and I've done the whole thing myself.",
    ),
    (
        "Can I still get into grad school with a 3.1 GPA?",
        "My last two years are much better than my first two.",
    ),
    (
        "Is it normal to feel lost in sophomore year?",
        "Everyone seems to know what they want to do except me.",
    ),
    (
        "Internship or summer classes?",
        "I got an unpaid internship offer but summer classes would let me graduate sooner.",
    ),
    (
        "How do I tell my parents I want to change my major?",
        "They're paying for school and really want me to do nursing.",
    ),
    ("Campus job recommendations?", "Looking for something with flexible hours where I can study on shift."),
    (
        "Dropped a class after the deadline, will it show a W?",
        "Registrar says it depends. Does a W look bad to grad schools?",
    ),
    (
        "Living off campus vs dorms for year two",
        "Off campus is cheaper but a 25 minute bus ride. Which did you pick?",
    ),
    (
        "How do you stay motivated in online classes?",
        "I keep falling behind on lectures because nobody checks.",
    ),
    ("Is it rude to eat in class?", "My only break is during a 3 hour lab block."),
    ("Advisor gave me wrong info and now I'm missing a requirement", "Is there anything I can do to appeal?"),
    (
        "Textbooks are insanely expensive",
        "Where do you all get yours? The bookstore wants $300 for one book.",
    ),
    (
        "Transferring from community college, any tips?",
        "Starting at a state university in the fall and I'm nervous about credits.",
    ),
    ("How early should I start applying for internships?", "I'm a sophomore in mechanical engineering."),
    ("Should I join a fraternity?", "I don't drink much but I want a social life."),
    ("Professor reads slides word for word", "Is it worth going to lecture if everything is posted online?"),
    ("How do you take notes in math classes?", "I can't keep up writing and listening at the same time."),
    (
        "Burnt out and it's only October",
        "Working, full course load, and barely sleeping. How do people manage?",
    ),
    (
        "Is double majoring worth the stress?",
        "Philosophy and computer science. I love both but it's a lot of credits.",
    ),
    ("How do I get research experience as a freshman?", "Every lab posting says prior experience required."),
    ("Academic probation after first semester", "What did you do to turn it around?"),
    ("Study abroad with a tight budget?", "Are there programs that don't cost more than a normal semester?"),
    ("TA grades way harsher than the other sections", "Is it worth bringing up with the professor?"),
    ("How to handle a professor who doesn't answer emails?", "I need a signature to register for next term."),
    ("Loud neighbors in the dorm at 3am", "RA hasn't done anything. Who do I talk to next?"),
    ("Is it bad to take a semester off?", "My mental health has been rough and I'm failing two classes."),
    ("What's a reasonable amount to spend on food per week?", "I'm cooking for myself for the first time."),
    (
        "How do you prepare for a cumulative final?",
        "The class covered 14 chapters and I forgot the first half.",
    ),
    (
        "Got caught using a calculator on a no-calculator quiz",
        "It was an honest mistake. How worried should I be?",
    ),
    ("How do I get better at public speaking for presentations?", "My voice shakes every time."),
    ("Should I retake a class for a better grade?", "I got a C in calc 2 and I'm applying to engineering."),
    ("Working full time while in college", "Anyone doing it? How do you schedule everything?"),
    (
        "What do you wish you knew freshman year?",
        "Starting in two weeks and I want to avoid the usual mistakes.",
    ),
    ("Is it worth going to career fairs as a freshman?", "I don't have much on my resume yet."),
    ("How do you deal with homesickness?", "I'm 2000 miles from home and first time away."),
    ("Scholarship requires a 3.0 and I'm at 2.9", "Is there usually a grace semester?"),
    ("Club meetings conflict with my only free time", "Is it worth staying in a club I can rarely attend?"),
    ("Best laptop for an engineering major?", "Budget around $900 and I need to run CAD."),
    (
        "Professor accused me of plagiarism I didn't commit",
        "The checker flagged my own earlier paper. What should I do?",
    ),
    ("How many clubs should I join?", "I signed up for eight at the fair and now I'm overwhelmed."),
    ("Pass/fail option for a gen ed", "Does it matter for med school if I take intro art pass/fail?"),
    ("Feeling like an impostor in honors classes", "Everyone seems smarter and more prepared than me."),
    ("Is the campus gym worth it?", "It's always packed between 4 and 7."),
    (
        "How do I approach a professor about a grade dispute?",
        "I think one question was graded wrong on the exam.",
    ),
    (
        "Any tips for a first-gen student?",
        "Nobody in my family has been to college and I don't know how things work.",
    ),
    ("Should I take the harder professor?", "Rate my professor says he's tough but you learn a lot."),
    ("How do you budget student loans?", "My refund came in and I'm scared of spending it all."),
    ("Morning classes or night classes?", "Trying to build next semester's schedule around a job."),
    ("Can I email a professor over the weekend?", "I have a question about the assignment due Monday."),
    ("What counts as a good internship for a business major?", "I only found a retail management position."),
    ("Lab partner never shows up", "Our lab reports are graded together. Do I tell the TA?"),
    ("Is summer housing usually cheaper?", "Thinking of staying on campus to do research."),
    (
        "How do you decide between two colleges?",
        "One is cheaper, the other has a better program for my major.",
    ),
]


def builtin_prompt_file(path: Path) -> str:
    path.write_text("".join(json.dumps({"prompt": f"Title: {t}\n\n{b}"}) + "\n" for t, b in BUILTIN_PROMPTS))
    return f"file:{path}"


# ============================================================================================ 1. matmul
def matmul_rate(m: int, k: int, n: int, seconds: float) -> dict:
    """FLOP/s of a plain fp32 (m x k) @ (k x n) `torch.mm`, repeated for >= `seconds` after a warm-up."""
    import torch

    a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    t = time.perf_counter()
    while True:  # warm-up: >= 2 calls and >= a quarter of the measured time
        torch.mm(a, b, out=out)
        torch.mm(a, b, out=out)
        if time.perf_counter() - t >= seconds / 4:
            break
    calls, t = 0, time.perf_counter()
    while True:
        torch.mm(a, b, out=out)
        calls += 1
        elapsed = time.perf_counter() - t
        if elapsed >= seconds:
            break
    flops = 2 * m * k * n
    return {
        "shape": f"({m} x {k}) @ ({k} x {n})",
        "calls": calls,
        "seconds": elapsed,
        "flop_per_s": flops * calls / elapsed,
    }


def matmul_baseline(shape: dict, n_body: int, n_head: int, seconds: float, tokens: int = 512) -> dict:
    body = matmul_rate(tokens, shape["hidden"], shape["intermediate"], seconds)
    head = matmul_rate(tokens, shape["hidden"], shape["vocab"], seconds)
    mixed = (n_body + n_head) / (n_body / body["flop_per_s"] + n_head / head["flop_per_s"])
    return {"body": body, "head": head, "weights": {"body": n_body, "head": n_head}, "flop_per_s": mixed}


# ============================================================================================ 2. PPO step
def matmul_params(policy) -> dict[str, int]:
    """Nb (every Linear weight of the LM but the output embedding), Nh (the LM head), Nv (the value head)."""
    import torch

    lm = policy.lm
    head = lm.get_output_embeddings()
    n_head = head.weight.numel()
    n_body = sum(m.weight.numel() for m in lm.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    n_value = policy.value_head.summary.weight.numel() if policy.value_head is not None else 0
    return {"body": n_body, "head": n_head, "value": n_value}


def batch_tokens(batch) -> dict:
    """Real prompt / response tokens per sequence, and the padded widths, of a step's `RolloutBatch`."""
    P = batch.prompt_len
    prompt = batch.attention_mask[:, :P].sum(1).tolist()
    response = batch.response_mask.sum(1).long().tolist()
    return {"prompt": prompt, "response": response, "padded_positions": int(batch.attention_mask.numel())}


def step_flops(tok: dict, n: dict[str, int], epochs: int, lora: bool = False) -> dict[str, float]:
    """Each phase's FLOPs (see the module docstring), and the head-on-every-token variant. With LoRA the
    update's backward computes activation gradients only (no frozen-weight gradients): 2 forwards' worth
    per epoch instead of 3 (the adapters' own FLOPs, rank 16, are under 3 % and not counted)."""
    nb, nh, nv = n["body"], n["head"], n["value"]
    pairs = list(zip(tok["prompt"], tok["response"], strict=True))
    rollout = sum(2 * nb * (p + r - 1) + 2 * nh * r for p, r in pairs)
    fwd = sum(2 * nb * (p + r) + 2 * nh * r for p, r in pairs)  # one forward, without the value head
    value = sum(2 * nv * r for _, r in pairs)
    logprobs = 2 * fwd + value
    update = epochs * (2 if lora else 3) * (fwd + value)
    tokens = sum(p + r for p, r in pairs)
    crude = (
        2 * (nb + nh + nv) * tokens * (1 + 2 + (2 if lora else 3) * epochs)
    )  # generation, 2 scoring forwards, update
    return {
        "rollout": float(rollout),
        "logprobs": float(logprobs),
        "update": float(update),
        "total": float(rollout + logprobs + update),
        "head_every_token": float(crude),
    }


def attention_share(tok: dict, layers: int, hidden: int, n_body: int) -> float:
    """Rough share of attention's quadratic FLOPs beside the counted ones: 2 * layers * hidden * L^2 per
    causal forward of L tokens against 2 * Nb * L."""
    lengths = [p + r for p, r in zip(tok["prompt"], tok["response"], strict=True)]
    return sum(layers * hidden * L * L for L in lengths) / sum(n_body * L for L in lengths)


# ============================================================================================ 3. evaluation
def raw_plan(lm, encoded, batch_size: int) -> list[tuple]:
    """The batches `CausalLM._loglik_shared` sends through the model, as (ids, mask, positions, keep) — same
    contexts (cut, sorted, chunked), same option batches and position ids; see the module docstring."""
    import torch

    from karma.tensors import left_pad, right_pad

    pad = lm.tokenizer.pad_token_id
    groups: dict[tuple[int, ...], list[int]] = {}
    conts = []
    for i, (ctx, cont) in enumerate(encoded):
        conts.append(cont[-lm.max_length :])
        groups.setdefault(tuple(ctx), []).append(i)
    ctx_list = [
        (list(k)[-max(lm.max_length - max(len(conts[i]) for i in v) + 1, 1) :], v) for k, v in groups.items()
    ]
    ctx_list.sort(key=lambda g: -len(g[0]))
    plan = []
    for start in range(0, len(ctx_list), batch_size):
        chunk = ctx_list[start : start + batch_size]
        ids, mask = left_pad([c for c, _ in chunk], pad)
        plan.append((ids, mask, None, 1))
        ctx_len = mask.sum(-1)
        rows = [(g, i) for g, (_, members) in enumerate(chunk) for i in members]
        multi = sorted(((g, i) for g, i in rows if len(conts[i]) > 1), key=lambda r: -len(conts[r[1]]))
        for r0 in range(0, len(multi), batch_size):
            part = multi[r0 : r0 + batch_size]
            o_ids, o_mask = right_pad([conts[i][:-1] for _, i in part], pad)
            sel = torch.tensor([g for g, _ in part])
            positions = ctx_len.index_select(0, sel)[:, None] + torch.arange(o_ids.shape[1])[None, :]
            plan.append((o_ids, o_mask, positions, None))
    return plan


def run_raw(lm, plan) -> None:
    import torch

    with torch.inference_mode():
        for ids, mask, positions, keep in plan:
            extra = {"logits_to_keep": keep} if keep and lm._keep_arg else {}
            lm.model(**lm._forward_kwargs(ids, mask, positions, use_cache=False, **extra)).logits  # noqa: B018


def eval_ratio(policy_path: str, args) -> dict:
    from karma.eval.scoring import CausalLM
    from karma.eval.tasks import content_free_requests, load_tasks, requests

    tasks = load_tasks(args.eval_suites, limit=args.eval_limit, data_dir=args.eval_data_dir, n_prompts=8)
    own = requests(tasks)
    reqs = own + content_free_requests(tasks, exclude=own)  # exactly what run_eval scores, in its order
    lm = CausalLM.load(policy_path, device="cpu", dtype="float32")
    encoded = [lm.encode_pair(c, o) for c, o in reqs]
    plan = raw_plan(lm, encoded, args.eval_batch_size)
    real = sum(int(mask.sum()) for _, mask, _, _ in plan)
    padded = sum(mask.numel() for _, mask, _, _ in plan)
    lm.loglikelihood(reqs[:4], batch_size=4, progress=False)  # warm-up
    run_raw(lm, plan[:1])
    seconds = {"raw": 0.0, "eval": 0.0}
    for _ in range(args.eval_repeats):  # raw, then the scorer, next to each other
        t = time.perf_counter()
        run_raw(lm, plan)
        seconds["raw"] += time.perf_counter() - t
        t = time.perf_counter()
        lm.loglikelihood(reqs, batch_size=args.eval_batch_size, progress=False)
        seconds["eval"] += time.perf_counter() - t
        print(
            f"eval: raw {seconds['raw']:.1f}s, loglikelihood {seconds['eval']:.1f}s (cumulative)", flush=True
        )
    n = len(reqs) * args.eval_repeats
    return {
        "suites": args.eval_suites,
        "limit": args.eval_limit,
        "options": len(reqs),
        "content_free_options": len(reqs) - len(own),
        "distinct_contexts": len({tuple(c) for c, _ in encoded}),
        "forwards": len(plan),
        "tokens_real": real,
        "tokens_padded": padded,
        "repeats": args.eval_repeats,
        "eval_s": seconds["eval"],
        "raw_s": seconds["raw"],
        "eval_options_per_s": n / seconds["eval"],
        "raw_options_per_s": n / seconds["raw"],
    }


# ============================================================================================ 4. held-out
def heldout_ratio(trainer, n: int) -> dict:
    from services.policy_trainer.heldout import engine_replies

    cfg, ev = trainer.cfg, trainer.cfg.eval
    pool = [trainer.heldout[i] for i in range(len(trainer.heldout))]
    source = "held-out split" if pool else "training prompts"
    k = 0
    while len(pool) < n:  # too few held-out prompts: top up with training prompts, cycled
        pool.append(trainer.prompts[k % len(trainer.prompts)])
        k += 1
    trainer.heldout = pool[:n]
    ids = [p.prompt_ids for p in trainer.heldout]
    temperature = cfg.rollout.temperature if ev.heldout_temperature is None else ev.heldout_temperature
    max_new = ev.heldout_max_new_tokens or cfg.rollout.max_new_tokens
    trainer.engine.generate(ids, seed=1, max_new_tokens=2, temperature=temperature)  # warm-up at this batch
    t = time.perf_counter()
    gens = engine_replies(trainer, "trained")
    held_s = time.perf_counter() - t
    held_tokens = sum(len(g.response_ids) for g in gens)
    t = time.perf_counter()
    one = trainer.engine.generate(ids, seed=ev.heldout_seed, max_new_tokens=max_new, temperature=temperature)
    one_s = time.perf_counter() - t
    one_tokens = sum(len(g.response_ids) for g in one)
    return {
        "prompts": len(ids),
        "source": source,
        "prompt_tokens_mean": statistics.fmean(len(x) for x in ids),
        "batch_size": ev.heldout_batch_size,
        "max_new_tokens": max_new,
        "temperature": temperature,
        "heldout_s": held_s,
        "heldout_tokens": held_tokens,
        "heldout_tokens_per_s": held_tokens / held_s,
        "one_batch_s": one_s,
        "one_batch_tokens": one_tokens,
        "one_batch_tokens_per_s": one_tokens / one_s,
    }


# ============================================================================================ the run
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--policy", default="smollm2", help="policy alias or folder (karma.models.resolve_policy)"
    )
    ap.add_argument("--rm", type=Path, help="reward model folder (default: MiniLM, untrained head)")
    ap.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    ap.add_argument("--prompts", help="reddit:DIR of a prepared data folder (default: 64 built-in posts)")
    ap.add_argument("--threads", type=int, help="torch threads (default: karma.threads.worker_threads)")
    ap.add_argument("--steps", type=int, default=3, help="timed PPO steps after one warm-up step")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-prompt-length", type=int, default=64)
    ap.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True, help="LoRA (the demo's)")
    ap.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the demo's; its recomputed forward is not counted as work, so it shows in the update's ratio",
    )
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--mini-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--matmul-s", type=float, default=2.0, help="seconds each matmul shape is repeated")
    ap.add_argument("--matmul-tokens", type=int, default=512)
    ap.add_argument("--eval-suites", default="pragmatics,side_effects,factuality")
    ap.add_argument("--eval-limit", type=int, default=10, help="items per task")
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--eval-repeats", type=int, default=1)
    ap.add_argument("--eval-data-dir", type=Path, help="folder holding eval/ (default: shared data)")
    ap.add_argument("--heldout", type=int, default=64, help="held-out prompts")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    from karma.threads import worker_threads

    threads = worker_threads(args.threads)
    import torch

    torch.set_num_threads(threads)  # before vLLM starts (it makes this a no-op afterwards)

    from transformers import AutoConfig

    from karma.models import minilm_path, resolve_policy
    from karma.rm.model import RewardModel, new_reward_model
    from services.policy_trainer.config import TrainConfig, vllm_available
    from services.policy_trainer.rewards import LocalRewardSource
    from services.policy_trainer.trainer import Trainer

    results: dict = {
        "machine": {
            "arch": platform.machine(),
            "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "threads": threads,
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },
        "args": {k: str(v) for k, v in vars(args).items()},
        "load_average_at_start": list(os.getloadavg()),
    }
    engine = args.engine
    if engine == "vllm" and not vllm_available():
        print("vllm is not importable: rollouts use transformers generate (engine hf)", flush=True)
        engine = "hf"
    results["engine"] = engine
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench_cpu_limits_"))
    rm_dir = args.rm or new_reward_model(str(minilm_path()), "context", max_length=256).save(tmp / "rm")
    reddit = bool(args.prompts and args.prompts.startswith("reddit:"))
    prompts = args.prompts or builtin_prompt_file(tmp / "prompts.jsonl")
    policy_path = resolve_policy(args.policy)
    text_cfg = AutoConfig.from_pretrained(policy_path).get_text_config()
    shape = {
        "hidden": text_cfg.hidden_size,
        "intermediate": text_cfg.intermediate_size,
        "vocab": text_cfg.vocab_size,
        "layers": text_cfg.num_hidden_layers,
    }
    cfg = TrainConfig.from_dict(
        {
            "model": {
                "policy": policy_path,
                "use_lora": args.lora,
                "gradient_checkpointing": args.gradient_checkpointing,
            },
            "data": {"prompts": prompts, "max_prompt_length": args.max_prompt_length, "max_prompts": 128},
            "rollout": {
                "engine": engine,
                "max_new_tokens": args.max_new_tokens,
                "vllm_enforce_eager": True,
                "vllm_kv_cache_gib": 0.1,
                "vllm_max_num_seqs": 16,
            },
            "reward": {"reward_model": str(rm_dir)},
            "ppo": {
                "algo": "ppo",
                "prompts_per_step": args.prompts_per_step,
                "samples_per_prompt": 1,
                "mini_batch_size": args.mini_batch,
                "micro_batch_size": args.micro_batch,
                "epochs": args.epochs,
                "learning_rate": args.learning_rate,
                "kl_coef": 0.05,
            },
            "run": {
                "steps": 1 + args.steps,
                "output_dir": str(tmp / "run"),
                "save_every": 0,
                "report_to": ["jsonl"],
                "torch_threads": threads,
            },
            "eval": {"heldout_prompts": args.heldout if reddit else 0},
        }
    )
    trainer = Trainer(cfg, reward_source=LocalRewardSource(RewardModel.load(rm_dir)))
    try:
        trainer.setup()
        results["torch_threads_after_setup"] = torch.get_num_threads()
        n = matmul_params(trainer.policy)
        results["model"] = {"path": policy_path, **shape, "matmul_params": n}
        print(
            f"set-up {time.perf_counter() - t0:.1f}s; {threads} threads; engine {engine}; N {n}", flush=True
        )
        base = matmul_baseline(shape, n["body"], n["head"], args.matmul_s, args.matmul_tokens)
        results["matmul"] = base
        print(
            f"matmul: body {base['body']['flop_per_s'] / 1e9:.1f}, head {base['head']['flop_per_s'] / 1e9:.1f}, "
            f"weighted {base['flop_per_s'] / 1e9:.1f} GFLOP/s",
            flush=True,
        )

        last: list[dict] = []
        rollout = trainer.rollout

        def keep_batch():
            batch = rollout()
            last[:] = [batch_tokens(batch)]
            return batch

        trainer.rollout = keep_batch
        trainer.train_step()  # warm-up (first-call costs of every phase)
        rows = []
        for _ in range(args.steps):
            m = trainer.train_step()
            tok = last[0]
            f = step_flops(tok, n, args.epochs, args.lora)
            timing = {k.removeprefix("timing/"): v for k, v in m.items() if k.startswith("timing/")}
            rows.append(
                {
                    "step": m["step"],
                    "step_s": m["speed/step_s"],
                    "timing": timing,
                    "flops": f,
                    "prompt_tokens": sum(tok["prompt"]),
                    "response_tokens": sum(tok["response"]),
                    "padded_positions": tok["padded_positions"],
                    "attention_share_not_counted": attention_share(
                        tok, shape["layers"], shape["hidden"], n["body"]
                    ),
                }
            )
            print(
                f"step {m['step']}: {m['speed/step_s']:.1f}s, {f['total'] / m['speed/step_s'] / 1e9:.2f} GFLOP/s "
                f"({', '.join(f'{k} {v:.1f}s' for k, v in timing.items())})",
                flush=True,
            )
        step_s = sum(r["step_s"] for r in rows)
        ppo = {
            "steps": len(rows),
            "step_s": step_s / len(rows),
            "flop_per_s": sum(r["flops"]["total"] for r in rows) / step_s,
            "flop_per_s_head_every_token": sum(r["flops"]["head_every_token"] for r in rows) / step_s,
            "phases": {},
            "rows": rows,
        }
        for phase in sorted({k for r in rows for k in r["timing"]}):
            s = sum(r["timing"].get(phase, 0.0) for r in rows)
            entry = {"s": s / len(rows), "share": s / step_s}
            if phase in ("rollout", "logprobs", "update"):
                entry["flop_per_s"] = sum(r["flops"][phase] for r in rows) / s
                entry["ratio_to_matmul"] = entry["flop_per_s"] / base["flop_per_s"]
            ppo["phases"][phase] = entry
        results["ppo_step"] = ppo

        results["heldout"] = heldout_ratio(trainer, args.heldout)
        h = results["heldout"]
        print(
            f"held-out: {h['heldout_tokens_per_s']:.1f} tok/s vs one batch {h['one_batch_tokens_per_s']:.1f}",
            flush=True,
        )
    finally:
        trainer.close()
    results["eval"] = eval_ratio(policy_path, args)
    results["matmul_at_end"] = matmul_baseline(shape, n["body"], n["head"], args.matmul_s, args.matmul_tokens)
    results["ratios"] = {
        "ppo_step_over_matmul": ppo["flop_per_s"] / base["flop_per_s"],
        "ppo_step_over_matmul_head_every_token": ppo["flop_per_s_head_every_token"] / base["flop_per_s"],
        "eval_over_raw_forward": results["eval"]["eval_options_per_s"] / results["eval"]["raw_options_per_s"],
        "heldout_over_one_batch": h["heldout_tokens_per_s"] / h["one_batch_tokens_per_s"],
    }
    results["load_average_at_end"] = list(os.getloadavg())
    results["total_s"] = time.perf_counter() - t0
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    r, ph = results["ratios"], ppo["phases"]
    per_phase = ", ".join(f"{k} {ph[k]['ratio_to_matmul']:.2f}" for k in ("rollout", "logprobs", "update"))
    print(
        f"\nPPO step FLOP/s / matmul FLOP/s:          {r['ppo_step_over_matmul']:.3f} (goal >= 0.35; {per_phase})"
    )
    print(f"eval options/s / raw forward options/s:   {r['eval_over_raw_forward']:.3f} (goal >= 0.8)")
    print(f"held-out tok/s / one engine batch tok/s:  {r['heldout_over_one_batch']:.3f} (goal >= 0.8)")


if __name__ == "__main__":
    main()
