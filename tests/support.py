"""Test support, outside the product: tiny seeded models and data in the real formats, a real uvicorn on
loopback in a thread, and real r/college items from the shared data. Used by tests/ and benchmarks/:

    from tests.support import make_tiny_rm, serve_in_thread   # pytest adds the repository root to sys.path

The product never imports this module (tests/test_architecture.py checks it); what product code needs
itself lives in the product: `karma.net` (free_port, wait_http_ok), `karma.paths` (shared_data_dir).

The synthetic karma of `write_prepared_data` has a learnable signal: responses with more "good" words score
higher, and (for the `full` variant's metadata) earlier replies score a little higher, so a few training
steps can show a falling loss and above-chance pairwise accuracy.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from karma.net import free_port, wait_http_ok
from karma.paths import shared_data_dir

__all__ = [
    "SCORE_TOL_F64",
    "float64_settings",
    "make_tiny_causal_lm",
    "make_tiny_rm",
    "reddit_items",
    "serve_in_thread",
    "tiny_backbone",
    "write_prepared_data",
]


# ------------------------------------------------------------------------------------------- reward models
def make_tiny_rm(
    path: str | Path, variant: str = "context", *, seed: int = 0, max_length: int = 64, **config
) -> Path:
    """A 2-layer, hidden-32 random BERT reward model with MiniLM's tokenizer, saved as a KARMA RM folder.

    Different seeds give different weights, hence different `version`s (useful for hot-swap tests).
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from karma.models import minilm_path
    from karma.rm.model import new_reward_model

    path = Path(path)
    backbone = path.with_name(path.name + ".backbone")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        initializer_range=0.5,  # large random weights: scores that differ visibly between inputs
    )
    BertModel(cfg).save_pretrained(backbone)
    tok.save_pretrained(backbone)
    torch.manual_seed(seed + 1)
    rm = new_reward_model(str(backbone), variant, max_length=max_length, **config)
    rm.save(path)
    return path


#: Bound on |a - b| for two float64 scorings of the same item by the same tiny RM (`make_tiny_rm`) in any two
#: batch compositions: served vs offline, alone vs batched across requests, before vs after the cache.
#: What differs is the batch an item is in, hence the padded length and the GEMM shapes, hence the order in which
#: the kernels sum (padded keys add exact zeros to the softmax). The longest reduction in the tiny BERT is 64
#: terms (the FFN down-projection; attention over at most max_length = 64 keys); each sum in another order stays
#: within 64 u |terms| of the exact one. The large random weights (initializer_range 0.5) then amplify: the same
#: items alone and batched differed by up to 2.6e-5 in float32 (unit roundoff u = 2^-24 = 6.0e-8: ~430 u, on
#: scores of magnitude <= 3, |score| <= sum |classifier weights| ~ 12 after the tanh pooler) -- the 1e-5 and
#: 1e-4 the tests had were no bound there. In float64 (u = 2^-53 = 1.1e-16) the same arithmetic gave <= 3.4e-14
#: (~300 u). SCORE_TOL_F64 = 1e-10 is 9e5 u: it holds on any IEEE-754 CPU (x86-64 or ARM; every kernel rounds
#: in float64 to within a few u per operation, and the amplification is a property of the weights, ~300 u, not
#: of the CPU), while a real bug -- another item's score, a missed or doubled normalisation ((s - 0.25) / 2), a
#: dropped metadata header, another truncation -- moves a score by the order of the gap between two items'
#: scores: 2e-3 or more between the items of these tests (measured; the scores spread over ~4), seven orders of
#: magnitude above it.
SCORE_TOL_F64 = 1e-10


def float64_settings(**settings):
    """`Settings(**settings, dtype="float64")`: the tests that compare served scores with offline ones across
    batch compositions serve in float64 -- everything else as configured -- and compare with
    `RewardModel.load(path, dtype="float64")` within `SCORE_TOL_F64` (JSON carries a float64 exactly: Python
    writes the shortest repr that reads back to the same double)."""
    from services.reward_api.core.config import Settings

    return Settings(**settings, dtype="float64")


def tiny_backbone(path: str | Path, *, hidden: int = 32, layers: int = 2) -> Path:
    """A random BertModel (hidden 32, 2 layers) saved with all-MiniLM-L6-v2's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from karma.models import minilm_path

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
    )
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------ servers
@contextmanager
def serve_in_thread(
    app,
    *,
    port: int | None = None,
    ready_path: str | None = "/ready",
    timeout: float = 120.0,
    **uvicorn_kwargs,
) -> Iterator[str]:
    """Run `app` on a real uvicorn at 127.0.0.1:<free port> in a daemon thread; yield its base URL.

    Waits until uvicorn accepts connections and, with `ready_path`, until that path answers 200.
    """
    import uvicorn

    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_kwargs)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn exited during startup")
            if time.monotonic() > deadline:
                raise TimeoutError(f"uvicorn did not start on {url} within {timeout}s")
            time.sleep(0.02)
        if ready_path:

            def still_serving() -> None:
                if not thread.is_alive():
                    raise RuntimeError(f"uvicorn on {url} exited before {ready_path} answered 200")

            wait_http_ok(
                url + ready_path, max(deadline - time.monotonic(), 0.0), interval_s=0.05, check=still_serving
            )
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


# -------------------------------------------------------------------------------------------- real data
def reddit_items(n: int, data_dir: str | Path | None = None, skip: int = 0, every: int = 1) -> list[dict]:
    """`n` real (context, response, metadata) items from the r/college dumps in shared data: context = post
    title + body + the parent comment when it is in the dump; deleted bodies skipped; every `every`-th
    eligible comment (spreads the sample over many threads). Deterministic."""
    import io

    import zstandard

    base = Path(data_dir or shared_data_dir()) / "reddit" / "college_2011_2022"

    def lines(name: str):
        with open(base / name, "rb") as fh:
            reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(fh)
            for line in io.TextIOWrapper(reader, encoding="utf-8"):
                if line.strip():
                    yield json.loads(line)

    posts = {p["id"]: p for p in lines("RS_college.zst")}
    comments: dict[str, dict] = {}
    items: list[dict] = []
    seen = 0
    for c in lines("RC_college.zst"):
        comments[c["id"]] = c
        body = c.get("body") or ""
        if body in ("[deleted]", "[removed]") or not body.strip():
            continue
        seen += 1
        if (seen - 1) % every:
            continue
        post = posts.get(c["link_id"].removeprefix("t3_"), {})
        turns = [post.get("title") or "", post.get("selftext") or ""]
        parent = (
            comments.get(c["parent_id"].removeprefix("t1_")) if c["parent_id"].startswith("t1_") else None
        )
        if parent is not None:
            turns.append(parent.get("body") or "")
        created = post.get("created_utc")
        meta = {
            "subreddit": c.get("subreddit"),
            "depth": c.get("depth"),
            "seconds_since_post": (c["created_utc"] - created) if created else None,
            "created_utc": c.get("created_utc"),
        }
        items.append(
            {
                "context": [{"role": "user", "content": t} for t in turns if t.strip()],
                "response": body,
                "metadata": meta,
            }
        )
        if len(items) >= skip + n:
            break
    return items[skip:]


# ------------------------------------------------------------------------------------------ prepared data
GOOD = ("thanks", "helpful", "great", "agree", "congrats", "source", "exactly", "love")
BAD = ("wrong", "stupid", "whatever", "lol", "no", "meh", "ugh", "spam")
NEUTRAL = (
    "college",
    "class",
    "essay",
    "major",
    "campus",
    "dorm",
    "exam",
    "professor",
    "the",
    "a",
    "is",
    "my",
)


def _comment(rng: random.Random) -> tuple[str, int]:
    n_good, n_bad = rng.randint(0, 3), rng.randint(0, 3)
    words = [rng.choice(GOOD) for _ in range(n_good)] + [rng.choice(BAD) for _ in range(n_bad)]
    words += [rng.choice(NEUTRAL) for _ in range(rng.randint(2, 6))]
    rng.shuffle(words)
    return " ".join(words), n_good - n_bad


def write_prepared_data(
    path: str | Path,
    *,
    n_threads: int = 60,
    comments_per_thread: int = 6,
    seed: int = 0,
    metadata: bool = True,
    subreddits: tuple[str, ...] = ("College", "ApplyingToCollege"),
    min_ratio: float = 2.0,
    max_pairs_per_parent: int = 5,
) -> Path:
    """Write examples.parquet, pairs.parquet and card.json in the prepared-data schema.

    Threads are split 70/15/15 into train/val/test by thread. `metadata=False` drops the columns the
    `full` variant needs (to test the error it raises).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from karma.rm.template import context_text

    rng = random.Random(seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rows, pairs = [], []
    t0 = 1_600_000_000
    for t in range(n_threads):
        thread_id = f"th{t:04d}"
        split = "train" if t < 0.7 * n_threads else "val" if t < 0.85 * n_threads else "test"
        sub = subreddits[t % len(subreddits)]
        title, body = f"question {t} about {rng.choice(NEUTRAL)}", f"my {rng.choice(NEUTRAL)} story {t}"
        post_time = t0 + t * 86400
        comments = []
        for c in range(comments_per_thread):
            text, signal = _comment(rng)
            since_post = float(rng.randint(60, 20 * 3600))
            early = 1.0 if since_post < 3 * 3600 else 0.0
            score = round(2 ** (signal + early + rng.gauss(0, 0.5))) + rng.randint(-1, 1)
            comments.append(
                {
                    "example_id": f"c{t:04d}{c:02d}",
                    "source": "pushshift",
                    "subreddit": sub,
                    "thread_id": thread_id,
                    "parent_id": f"t3_{thread_id}",
                    "post_title": title,
                    "post_body": body,
                    "context_comments": [],
                    "context_missing": False,
                    "context": context_text([title, body]),
                    "response": text,
                    "score": score,
                    "karma": math.copysign(math.log1p(abs(score)), score),
                    "created_utc": int(post_time + since_post),
                    "seconds_since_post": since_post,
                    "seconds_since_parent": since_post,
                    "depth": 0,
                    "sibling_count": comments_per_thread - 1,
                    "split": split,
                }
            )
        rows.extend(comments)
        n_pairs = 0
        by_time = sorted(comments, key=lambda r: r["created_utc"])
        for i, a in enumerate(by_time):
            for b in by_time[i + 1 :]:
                if n_pairs >= max_pairs_per_parent or a["score"] <= 0 or b["score"] <= 0:
                    continue
                if (
                    a["score"] / b["score"] >= min_ratio
                ):  # chosen written no later than rejected, scored higher
                    pairs.append(
                        {
                            "pair_id": f"{a['example_id']}-{b['example_id']}",
                            "split": split,
                            "subreddit": sub,
                            "thread_id": thread_id,
                            "parent_id": a["parent_id"],
                            "context": a["context"],
                            "context_missing": False,
                            "chosen_id": a["example_id"],
                            "rejected_id": b["example_id"],
                            "chosen": a["response"],
                            "rejected": b["response"],
                            "chosen_score": a["score"],
                            "rejected_score": b["score"],
                            "score_ratio": a["score"] / b["score"],
                            "chosen_karma": a["karma"],
                            "rejected_karma": b["karma"],
                        }
                    )
                    n_pairs += 1
    ex_schema = pa.schema(
        [
            ("example_id", pa.string()),
            ("source", pa.string()),
            ("subreddit", pa.string()),
            ("thread_id", pa.string()),
            ("parent_id", pa.string()),
            ("post_title", pa.string()),
            ("post_body", pa.string()),
            ("context_comments", pa.list_(pa.string())),
            ("context_missing", pa.bool_()),
            ("context", pa.string()),
            ("response", pa.string()),
            ("score", pa.int64()),
            ("karma", pa.float64()),
            ("created_utc", pa.int64()),
            ("seconds_since_post", pa.float64()),
            ("seconds_since_parent", pa.float64()),
            ("depth", pa.int32()),
            ("sibling_count", pa.int32()),
            ("split", pa.string()),
        ]
    )
    pair_schema = pa.schema(
        [
            ("pair_id", pa.string()),
            ("split", pa.string()),
            ("subreddit", pa.string()),
            ("thread_id", pa.string()),
            ("parent_id", pa.string()),
            ("context", pa.string()),
            ("context_missing", pa.bool_()),
            ("chosen_id", pa.string()),
            ("rejected_id", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("chosen_score", pa.int64()),
            ("rejected_score", pa.int64()),
            ("score_ratio", pa.float64()),
            ("chosen_karma", pa.float64()),
            ("rejected_karma", pa.float64()),
        ]
    )
    examples = pa.Table.from_pylist(rows, schema=ex_schema)
    if not metadata:
        examples = examples.drop_columns(
            ["seconds_since_post", "seconds_since_parent", "depth", "sibling_count"]
        )
    pq.write_table(examples, path / "examples.parquet")
    pq.write_table(pa.Table.from_pylist(pairs, schema=pair_schema), path / "pairs.parquet")
    splits = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    card = {
        "inputs": [{"path": "synthetic", "sha256": None, "bytes": 0}],
        "lines_read": len(rows),
        "kept": len(rows),
        "skipped": {},
        "split_sizes": splits,
        "pairs": len(pairs),
        "config": {"normalize": "log1p", "min_ratio": min_ratio, "seed": seed, "synthetic": True},
    }
    (path / "card.json").write_text(json.dumps(card, indent=2))
    return path


# ----------------------------------------------------------------------------------------------- policies
def make_tiny_causal_lm(path: str | Path, *, seed: int = 0, lora_of: str | Path | None = None) -> Path:
    """A 2-layer, hidden-32 random Llama with SmolLM2's tokenizer (and chat template), saved at `path`.

    With `lora_of`, save instead a random (non-zero) LoRA adapter on top of that tiny model folder.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from karma.models import smollm2_path

    path = Path(path)
    torch.manual_seed(seed)
    if lora_of is not None:
        from peft import LoraConfig, get_peft_model

        base = AutoModelForCausalLM.from_pretrained(lora_of)
        peft_model = get_peft_model(
            base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        )
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)  # PEFT starts B at zero: make the adapter change the model
        peft_model.save_pretrained(path)
        return path
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger random logits than the default init: options get visibly different scores
        model.lm_head.weight.normal_(std=0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def cli_text(output: str) -> str:
    """A command's output with typer's boxes and line wrapping taken out (for matching messages)."""
    import re

    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())
