"""Tiny, seeded stand-ins for tests and demos: a random 2-layer BERT backbone, an untrained RM folder,
and a small prepared-data folder with the exact schema of `karma data prepare` (architecture.md §1).

The synthetic karma has a learnable signal: responses with more "good" words score higher, and (for the
`full` variant's metadata) earlier replies score a little higher — so a few training steps can show a
falling loss and above-chance pairwise accuracy.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

GOOD = ("thanks", "helpful", "great", "agree", "congrats", "source", "exactly", "love")
BAD = ("wrong", "stupid", "whatever", "lol", "no", "meh", "ugh", "spam")
NEUTRAL = ("college", "class", "essay", "major", "campus", "dorm", "exam", "professor", "the", "a", "is", "my")


def tiny_backbone(path: str | Path, *, hidden: int = 32, layers: int = 2) -> Path:
    """A random BertModel (hidden 32, 2 layers) saved with all-MiniLM-L6-v2's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from karma.models import minilm_path

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=512,
    )
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_reward_model(path: str | Path, variant: str = "context", *, max_length: int = 64) -> Path:
    """An untrained (random head) KARMA RM folder on the tiny backbone — loadable by RewardModel.load."""
    from karma.rm.model import new_reward_model

    path = Path(path)
    backbone = tiny_backbone(path.parent / f"{path.name}-backbone")
    return new_reward_model(str(backbone), variant, max_length=max_length).save(path)


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
            comments.append({
                "example_id": f"c{t:04d}{c:02d}", "source": "pushshift", "subreddit": sub, "thread_id": thread_id,
                "parent_id": f"t3_{thread_id}", "post_title": title, "post_body": body, "context_comments": [],
                "context_missing": False, "context": context_text([title, body]), "response": text,
                "score": score, "karma": math.copysign(math.log1p(abs(score)), score),
                "created_utc": int(post_time + since_post), "seconds_since_post": since_post,
                "seconds_since_parent": since_post, "depth": 0, "sibling_count": comments_per_thread - 1,
                "split": split,
            })
        rows.extend(comments)
        n_pairs = 0
        by_time = sorted(comments, key=lambda r: r["created_utc"])
        for i, a in enumerate(by_time):
            for b in by_time[i + 1:]:
                if n_pairs >= max_pairs_per_parent or a["score"] <= 0 or b["score"] <= 0:
                    continue
                if a["score"] / b["score"] >= min_ratio:  # chosen written no later than rejected, scored higher
                    pairs.append({
                        "pair_id": f"{a['example_id']}-{b['example_id']}", "split": split, "subreddit": sub,
                        "thread_id": thread_id, "parent_id": a["parent_id"], "context": a["context"],
                        "context_missing": False, "chosen_id": a["example_id"], "rejected_id": b["example_id"],
                        "chosen": a["response"], "rejected": b["response"], "chosen_score": a["score"],
                        "rejected_score": b["score"], "score_ratio": a["score"] / b["score"],
                        "chosen_karma": a["karma"], "rejected_karma": b["karma"],
                    })
                    n_pairs += 1
    ex_schema = pa.schema([
        ("example_id", pa.string()), ("source", pa.string()), ("subreddit", pa.string()), ("thread_id", pa.string()),
        ("parent_id", pa.string()), ("post_title", pa.string()), ("post_body", pa.string()),
        ("context_comments", pa.list_(pa.string())), ("context_missing", pa.bool_()), ("context", pa.string()),
        ("response", pa.string()), ("score", pa.int64()), ("karma", pa.float64()), ("created_utc", pa.int64()),
        ("seconds_since_post", pa.float64()), ("seconds_since_parent", pa.float64()), ("depth", pa.int32()),
        ("sibling_count", pa.int32()), ("split", pa.string()),
    ])
    pair_schema = pa.schema([
        ("pair_id", pa.string()), ("split", pa.string()), ("subreddit", pa.string()), ("thread_id", pa.string()),
        ("parent_id", pa.string()), ("context", pa.string()), ("context_missing", pa.bool_()),
        ("chosen_id", pa.string()), ("rejected_id", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
        ("chosen_score", pa.int64()), ("rejected_score", pa.int64()), ("score_ratio", pa.float64()),
        ("chosen_karma", pa.float64()), ("rejected_karma", pa.float64()),
    ])
    examples = pa.Table.from_pylist(rows, schema=ex_schema)
    if not metadata:
        examples = examples.drop_columns(["seconds_since_post", "seconds_since_parent", "depth", "sibling_count"])
    pq.write_table(examples, path / "examples.parquet")
    pq.write_table(pa.Table.from_pylist(pairs, schema=pair_schema), path / "pairs.parquet")
    splits = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    card = {
        "inputs": [{"path": "synthetic", "sha256": None, "bytes": 0}], "lines_read": len(rows), "kept": len(rows),
        "skipped": {}, "split_sizes": splits, "pairs": len(pairs),
        "config": {"normalize": "log1p", "min_ratio": min_ratio, "seed": seed, "synthetic": True},
    }
    (path / "card.json").write_text(json.dumps(card, indent=2))
    return path
