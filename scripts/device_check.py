#!/usr/bin/env python3
"""One short check of KARMA's GPU code paths, printing one JSON of throughputs and their ratios.

    python scripts/device_check.py                 # CUDA, bf16, the real architectures (random weights)
    python scripts/device_check.py --cpu --tiny    # CPU, float32, tiny configs: seconds (the test suite)

What it runs, with the real architectures built from the configs in `karma/configs/arch/` (MiniLM-L6 = the
`BertModel` config of sentence-transformers/all-MiniLM-L6-v2, the RM backbone; SmolLM2-135M = its
`LlamaConfig`, the policy) and random weights — no weights travel:

1. `rm_serving`: a KARMA reward-model folder on that backbone, scored (a) raw: `RewardModel.forward` on
   pre-encoded batches of 64 items, and (b) served: `karma serve` (a child process, real uvicorn) under
   `--concurrency` clients sending 64-item `/v1/score` requests through `karma.client.RewardClient`.
   ratio = served seq/s / raw seq/s (what tokenising, HTTP, JSON and batching cost).
2. `ppo_step`: `karma train`'s `Trainer` (PPO, `hf` rollout engine, rewards from that service over HTTP)
   for a few steps; its update's non-padding tokens/s / a raw forward+backward (cross-entropy) of the same
   architecture on the same tokens.
3. `generation`: the trainer's rollout tokens/s (transformers `generate` through the `hf` engine) / a raw
   `generate` of the same architecture, same batch and length.

Tokenizers: none are shipped or needed. Both models get a synthetic word-level tokenizer built at run time
(`w0 w1 ...`, one token a word, the architecture's vocabulary size; the policy's with a ChatML template), and
inputs are random words, so every code path — tokenising, chat template, decoding — runs on known lengths.

The GPU box has no package index and lacks fastapi, uvicorn, pydantic and pydantic-settings: when they are
not importable, the wheels in `wheels/` (scripts/device-wheels.sh) are unpacked to a temporary folder put
on sys.path (and on PYTHONPATH for the server child). Packages the box lacks and these paths must not need
(duckdb, zstandard, trl, vLLM, scipy, ...) are made unimportable here too, so a CPU run catches an import
that would fail there. The whole check stops at `--budget-s` (default 540 s) with what it has.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARCH = ROOT / "karma" / "configs" / "arch"
#: not on the GPU box and not carried: importing any of them here fails as it would there
ABSENT_ON_BOX = (
    "duckdb",
    "zstandard",
    "trl",
    "vllm",
    "scipy",
    "sklearn",
    "datasets",
    "tensorboard",
    "matplotlib",
    "gguf",
    "sentencepiece",
)
#: carried as wheels (scripts/device-wheels.sh); used only where the interpreter lacks them
CARRIED = ("fastapi", "starlette", "uvicorn", "pydantic", "pydantic_core", "pydantic_settings", "dotenv")
REQUEST_ITEMS = 64

RESULT: dict[str, Any] = {}


def note(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] device-check: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ environment
def prepare_imports(wheels: Path) -> str | None:
    """Repository root first on sys.path; the carried wheels unpacked and added when the interpreter lacks
    them; the absent packages made unimportable. Returns the unpacked folder (for the child's PYTHONPATH)."""
    sys.path.insert(0, str(ROOT))
    for name in ABSENT_ON_BOX:
        sys.modules.setdefault(name, None)  # `import x` raises ModuleNotFoundError, find_spec(x) is None
    missing = [m for m in CARRIED if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise SystemExit(
            f"device-check: {', '.join(missing)} not importable and no wheels in {wheels} "
            "(run scripts/device-wheels.sh where PyPI is reachable)"
        )
    site = Path(tempfile.gettempdir()) / f"karma-device-site-{os.getuid()}"
    shutil.rmtree(site, ignore_errors=True)
    used = [whl for whl in found if _needed(whl)]
    for whl in used:
        with zipfile.ZipFile(whl) as z:  # a wheel is a zip of its site-packages content
            z.extractall(site)
    sys.path.insert(1, str(site))
    importlib.invalidate_caches()
    still = [m for m in CARRIED if importlib.util.find_spec(m) is None]
    if still:
        raise SystemExit(f"device-check: still not importable after unpacking {wheels}: {', '.join(still)}")
    note(f"{', '.join(missing)} missing: unpacked {len(used)} of the {len(found)} wheels in {wheels}")
    return str(site)


def _needed(whl: Path) -> bool:
    """A carried wheel is used when its distribution is not installed, or installed in an older version
    (pydantic needs a newer typing-extensions than some torch installs have); the rest stay as they are."""
    import importlib.metadata

    from packaging.version import Version

    dist, version = whl.name.split("-")[:2]
    try:
        return Version(importlib.metadata.version(dist)) < Version(version)
    except importlib.metadata.PackageNotFoundError:
        return True


def child_env(site: str | None) -> dict[str, str]:
    paths = [str(ROOT)] + ([site] if site else []) + [p for p in [os.environ.get("PYTHONPATH")] if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


# ------------------------------------------------------------------------------------------ the models
def arch_config(name: str):
    from transformers import AutoConfig

    data = json.loads((ARCH / f"{name}.json").read_text())
    for key in ("_name_or_path", "_model_name_or_path", "transformers_version", "architectures", "dtype"):
        data.pop(key, None)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def bert_tokenizer(vocab_size: int):
    """A BERT word-piece tokenizer whose vocabulary is BERT's specials and `w0 w1 ...`: one token a word."""
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = specials + [f"w{i}" for i in range(vocab_size - len(specials))]
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer(vocab_size: int):
    """SmolLM2's special-token layout (0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|> = EOS = pad) over a
    word-level vocabulary `w0 w1 ...`, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = ["system", "user", "assistant"]
    words += [f"w{i}" for i in range(vocab_size - len(specials) - len(words))]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token=specials[0]))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece()  # joins the words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token=specials[0],
        bos_token=specials[1],
        eos_token=specials[2],
        pad_token=specials[2],
    )
    tok.chat_template = CHATML
    return tok


def words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"w{rng.randrange(vocab)}" for _ in range(n))


def build_assets(work: Path, args, torch) -> dict[str, Any]:
    """The RM folder (random MiniLM backbone + head, KARMA format), the policy folder (random SmolLM2), the
    prompts file; their shapes."""
    from transformers import BertModel, LlamaForCausalLM

    from karma.rm.model import new_reward_model

    t0 = time.perf_counter()
    torch.manual_seed(0)
    bert_cfg = arch_config(args.rm_arch)
    backbone = work / "rm_backbone"
    bert_tokenizer(bert_cfg.vocab_size).save_pretrained(backbone)
    BertModel(bert_cfg).save_pretrained(backbone)
    rm_folder = new_reward_model(str(backbone), "context", max_length=args.rm_max_length).save(work / "rm")

    llama_cfg = arch_config(args.policy_arch)
    llama_cfg.bos_token_id, llama_cfg.eos_token_id, llama_cfg.pad_token_id = 1, 2, 2
    policy = work / "policy"
    tok = chat_tokenizer(llama_cfg.vocab_size)
    with torch.device(args.device):
        model = LlamaForCausalLM(llama_cfg).to(getattr(torch, args.dtype))
    model.save_pretrained(policy)
    tok.save_pretrained(policy)
    del model

    rng = random.Random(0)
    prompts = work / "prompts.jsonl"
    with prompts.open("w") as f:
        for _ in range(4 * args.prompts_per_step):
            f.write(json.dumps({"prompt": words(rng, args.prompt_words, 1000)}) + "\n")
    prompt_len = len(
        tok.apply_chat_template(
            [{"role": "user", "content": words(rng, args.prompt_words, 1000)}],
            add_generation_prompt=True,
            tokenize=True,
        )["input_ids"]
    )
    note(f"models and data built in {time.perf_counter() - t0:.1f}s")
    return {
        "rm_folder": rm_folder,
        "policy": policy,
        "prompts": prompts,
        "prompt_tokens": prompt_len,
        "llama_cfg": llama_cfg,
        "tokenizer": tok,
    }


def free_memory(torch) -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ 1. RM serving
def rm_items(n: int, args) -> list[dict[str, str]]:
    rng = random.Random(1)
    return [
        {"context": words(rng, args.rm_words, 1000), "response": words(rng, args.rm_words, 1000)}
        for _ in range(n)
    ]


def timed_loop(fn, seconds: float, min_iters: int, sync) -> tuple[int, float]:
    """Call fn() (after one warm-up call) until `seconds` passed and at least `min_iters` calls; (calls, s)."""
    fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    sync()
    return n, time.perf_counter() - t0


def raw_rm_forward(assets, args, torch, sync) -> dict[str, float]:
    from karma.protocol import ScoreItem
    from karma.rm.model import RewardModel, RMInput

    rm = RewardModel.load(assets["rm_folder"], device=args.device, dtype=args.dtype)
    encoded = [
        rm.encode(RMInput(it.context, it.response))
        for it in (ScoreItem(**x) for x in rm_items(REQUEST_ITEMS, args))
    ]
    calls, seconds = timed_loop(lambda: rm.forward(encoded), args.seconds, 3, sync)
    ids = [i for e in encoded for i in e.input_ids]
    scores = rm.forward(encoded)
    mean = sum(scores) / len(scores)
    return {
        "raw_forward_seq_per_s": calls * REQUEST_ITEMS / seconds,
        "item_tokens": len(ids) / len(encoded),
        # the synthetic tokenizer really tokenises (template words aside, no [UNK]) and items score apart
        "unk_share": sum(i == rm.tokenizer.unk_token_id for i in ids) / len(ids),
        "score_std": math.sqrt(sum((x - mean) ** 2 for x in scores) / len(scores)),
    }


class ServeChild:
    """`karma serve` in a child process of this script (same import set-up), on a free loopback port."""

    def __init__(self, folder: Path, args, site: str | None, log: Path):
        from karma.net import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        flags = ["-S"] if sys.flags.no_site else []  # a run without site-packages: its child too
        cmd = [sys.executable, *flags, str(Path(__file__).resolve()), "--serve-child", "--"]
        cmd += ["serve", "--model", f"rm={folder}", "--port", str(self.port)]
        cmd += ["--device", args.device, "--dtype", args.dtype, "--log-level", "warning"]
        if args.torch_threads:
            cmd += ["--torch-threads", str(args.torch_threads)]
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(site))

    def wait_ready(self, timeout_s: float) -> float:
        from karma.net import wait_http_ok

        def alive() -> None:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"karma serve exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}"
                )

        return wait_http_ok(self.url + "/ready", timeout_s, interval_s=0.2, check=alive)

    def stop(self) -> None:
        from karma.net import stop_process

        stop_process(self.proc)


def served_rm(server: ServeChild, args) -> dict[str, float]:
    from karma.client import RewardClient

    items = rm_items(REQUEST_ITEMS, args)

    async def go() -> tuple[int, float]:
        async with RewardClient(server.url, batch_size=REQUEST_ITEMS, timeout=120, deadline_s=120) as rc:
            await asyncio.gather(*(rc.score(items) for _ in range(args.concurrency)))  # warm-up
            done, stop_at = 0, time.perf_counter() + args.seconds

            async def client() -> None:
                nonlocal done
                while time.perf_counter() < stop_at:
                    scores = (await rc.score(items)).scores
                    if len(scores) != REQUEST_ITEMS or not all(map(math.isfinite, scores)):
                        raise RuntimeError(f"bad scores from the service: {scores[:4]}...")
                    done += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(args.concurrency)))
            return done, time.perf_counter() - t0

    requests, seconds = asyncio.run(go())
    return {"server_seq_per_s": requests * REQUEST_ITEMS / seconds, "requests": requests}


# ------------------------------------------------------------------------------------------ 2. PPO step
def ppo_steps(assets, server_url: str, work: Path, args, torch) -> dict[str, Any]:
    import inspect

    from services.policy_trainer.config import TrainConfig
    from services.policy_trainer.trainer import Trainer

    out = work / "ppo"
    cfg = TrainConfig.from_dict(
        {
            "model": {"policy": str(assets["policy"]), "dtype": args.dtype},
            "data": {"prompts": f"file:{assets['prompts']}", "max_prompt_length": 4 * args.prompt_words},
            "rollout": {"engine": "hf", "max_new_tokens": args.new_tokens},
            "reward": {"reward_url": [server_url], "reward_ready_timeout_s": 120},
            "ppo": {
                "prompts_per_step": args.prompts_per_step,
                "mini_batch_size": args.prompts_per_step,
                "micro_batch_size": args.micro_batch,
                "epochs": 1,
            },
            "run": {
                "steps": args.steps,
                "output_dir": str(out),
                "save_every": 0,
                "report_to": ["jsonl"],
                "torch_threads": args.torch_threads,
            },
            "eval": {"heldout_prompts": 0},
        }
    )
    kwargs: dict[str, Any] = {}
    if "dist" in inspect.signature(Trainer).parameters:  # the trainer's device comes with its Distributed
        from services.policy_trainer.distributed import Distributed

        kwargs["dist"] = Distributed(device=torch.device(args.device))
    trainer = Trainer(cfg, **kwargs)
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
        device = str(next(trainer.policy.parameters()).device)
    finally:
        trainer.close()
        del trainer
        free_memory(torch)
    if result["status"] != "completed":
        raise RuntimeError(f"karma train did not complete: {result}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows  # the first step warms up (kernels, allocator)
    response_tokens = [r["speed/rollout_tokens_per_s"] * r["timing/rollout"] for r in timed]
    update_s = sum(r["timing/update"] for r in timed)
    rollout_s = sum(r["timing/rollout"] for r in timed)
    update_tokens = sum(n + args.prompts_per_step * assets["prompt_tokens"] for n in response_tokens)
    return {
        "trainer_device": device,
        "steps": len(rows),
        "timed_steps": len(timed),
        "fit_s": time.perf_counter() - t0,
        "step_s": sum(r["speed/step_s"] for r in timed) / len(timed),
        "update_tokens_per_s": update_tokens / update_s,
        "rollout_tokens_per_s": sum(response_tokens) / rollout_s,
        "mean_response_tokens": sum(response_tokens) / len(timed) / args.prompts_per_step,
        "reward_std": timed[-1].get("reward/std"),
    }


def raw_policy(assets, args, torch, sync) -> dict[str, float]:
    """Forward+backward (cross-entropy) and generate of the same architecture, dtype and shapes."""
    from transformers import LlamaForCausalLM

    with torch.device(args.device):
        model = LlamaForCausalLM(assets["llama_cfg"]).to(getattr(torch, args.dtype))
    length = assets["prompt_tokens"] + args.new_tokens
    vocab = assets["llama_cfg"].vocab_size
    ids = torch.randint(3, vocab, (args.micro_batch, length), device=args.device)

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    model.train()
    calls, seconds = timed_loop(fwd_bwd, args.seconds, 3, sync)
    fwd_bwd_tps = calls * ids.numel() / seconds

    model.eval()
    model.zero_grad(set_to_none=True)
    prompts = torch.randint(3, vocab, (args.prompts_per_step, assets["prompt_tokens"]), device=args.device)

    def generate() -> None:
        with torch.inference_mode():
            model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=True,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=2,
            )

    calls, seconds = timed_loop(generate, args.seconds, 1, sync)
    gen_tps = calls * prompts.shape[0] * args.new_tokens / seconds
    return {"raw_fwd_bwd_tokens_per_s": fwd_bwd_tps, "raw_generate_tokens_per_s": gen_tps}


# ------------------------------------------------------------------------------------------ driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (default: CUDA, which must be there)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs and short loops: seconds")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--wheels", type=Path, default=ROOT / "wheels", help="carried wheels (device-wheels.sh)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop (exit 3, partial JSON) after this")
    ap.add_argument("--seconds", type=float, help="length of each timed loop (default 5, tiny 0.5)")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent 64-item scoring clients")
    ap.add_argument("--steps", type=int, help="PPO steps (the first is a warm-up; default 4, tiny 2)")
    args = ap.parse_args(argv)
    args.device = "cpu" if args.cpu else "cuda"
    args.dtype = "float32" if args.cpu else "bfloat16"
    args.rm_arch, args.policy_arch = (
        ("minilm_tiny", "smollm2_tiny") if args.tiny else ("minilm", "smollm2_135m")
    )
    tiny = args.tiny
    args.seconds = args.seconds or (0.5 if tiny else 5.0)
    args.steps = args.steps or (2 if tiny else 4)
    args.rm_words = 16 if tiny else 100  # context and response: ~2 x words + template tokens per item
    args.rm_max_length = 256
    args.prompt_words = 8 if tiny else 64
    args.new_tokens = 8 if tiny else 128
    args.prompts_per_step = 4 if tiny else 32
    args.micro_batch = 4 if tiny else 16
    args.torch_threads = 1 if args.cpu else None
    return args


def watchdog(budget_s: float, cleanup: list) -> None:
    def fire() -> None:
        RESULT["error"] = f"over the {budget_s:.0f}s budget; partial results"
        for fn in cleanup:
            fn()
        print(json.dumps(RESULT, indent=2), flush=True)
        os._exit(3)

    timer = threading.Timer(budget_s, fire)
    timer.daemon = True
    timer.start()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-child"]:  # the server child: same imports, then `karma serve ARGS`
        prepare_imports(ROOT / "wheels")
        from karma.cli import app

        app(args=argv[2:], prog_name="karma")
        return 0
    args = parse_args(argv)
    start = time.perf_counter()
    cleanup: list = []
    watchdog(args.budget_s, cleanup)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    site = prepare_imports(args.wheels)
    if site is not None:
        cleanup.append(lambda: shutil.rmtree(site, ignore_errors=True))

    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device-check: CUDA is not available (use --cpu for a CPU run)")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    RESULT.update(
        {
            "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
            "dtype": args.dtype,
            "mode": "tiny" if args.tiny else "full",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
            "carried_wheels": site is not None,
            "tokenizers": "synthetic word-level, built at run time (no tokenizer files shipped)",
            "archs": {"rm": args.rm_arch, "policy": args.policy_arch},
        }
    )
    work = Path(tempfile.mkdtemp(prefix="karma-device-check-"))
    cleanup.append(lambda: shutil.rmtree(work, ignore_errors=True))
    server = None
    try:
        assets = build_assets(work, args, torch)

        note("1/3 reward model: raw forward")
        rm = {"request_items": REQUEST_ITEMS, "concurrency": args.concurrency}
        rm |= raw_rm_forward(assets, args, torch, sync)
        free_memory(torch)
        RESULT["rm_serving"] = rm
        note("1/3 reward model: karma serve")
        server = ServeChild(assets["rm_folder"], args, site, work / "serve.log")
        cleanup.insert(0, server.stop)
        rm["server_start_s"] = server.wait_ready(240)
        rm |= served_rm(server, args)
        rm["ratio"] = rm["server_seq_per_s"] / rm["raw_forward_seq_per_s"]

        note("2/3 PPO steps (karma train's Trainer, hf engine, rewards over HTTP)")
        ppo = ppo_steps(assets, server.url, work, args, torch)
        server.stop()
        RESULT["ppo_step"] = ppo
        note("2/3 raw forward+backward and generate of the policy architecture")
        raw = raw_policy(assets, args, torch, sync)
        free_memory(torch)
        ppo["raw_fwd_bwd_tokens_per_s"] = raw["raw_fwd_bwd_tokens_per_s"]
        ppo["ratio"] = ppo["update_tokens_per_s"] / raw["raw_fwd_bwd_tokens_per_s"]
        RESULT["generation"] = {
            "trainer_tokens_per_s": ppo["rollout_tokens_per_s"],
            "raw_generate_tokens_per_s": raw["raw_generate_tokens_per_s"],
            "ratio": ppo["rollout_tokens_per_s"] / raw["raw_generate_tokens_per_s"],
            "batch": args.prompts_per_step,
            "new_tokens": args.new_tokens,
        }
        RESULT["ratios"] = {
            "rm_serving": rm["ratio"],
            "ppo_update": ppo["ratio"],
            "generation": RESULT["generation"]["ratio"],
        }
        if args.device == "cuda":
            RESULT["max_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
        if site is not None:
            shutil.rmtree(site, ignore_errors=True)
    RESULT["wall_s"] = time.perf_counter() - start
    text = json.dumps(RESULT, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
