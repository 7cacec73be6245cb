"""Reward-model speed on this CPU: training pairs/s and inference sequences/s of the default backbone.

    .venv/bin/python benchmarks/bench_rm.py [--backbone minilm] [--seq-len 128] [--batch 16] [--threads 1,2]

Training = one Bradley–Terry step (forward of chosen + rejected, backward, AdamW) on `--batch` pairs, i.e.
2·batch sequences of exactly `--seq-len` tokens; inference = `RewardModel.forward` on 2·batch sequences
under `torch.inference_mode`. Both go through `RewardModel.encode` / `collate`, the path training and the
reward service use. Each thread count is measured in the same process; the first thread count is the
baseline the others are compared with.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _texts(n: int, seq_len: int, tokenizer) -> list[str]:
    words = [
        "the",
        "college",
        "essay",
        "was",
        "helpful",
        "and",
        "my",
        "professor",
        "said",
        "the",
        "campus",
        "is",
        "great",
        "for",
        "a",
        "major",
    ]
    out = []
    for i in range(n):
        text = " ".join(words[(i + j) % len(words)] for j in range(seq_len))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: seq_len - 3]
        out.append(tokenizer.decode(ids))
    return out


def run(backbone: str, seq_len: int, batch: int, threads: int, steps: int) -> dict:
    import torch

    from karma.models import resolve_backbone
    from karma.rm.model import RMInput, new_reward_model
    from karma.rm.trainer import pairwise_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rm = new_reward_model(resolve_backbone(backbone), "context", max_length=seq_len)
    half = _texts(2 * batch, seq_len // 2, rm.tokenizer)
    items = [RMInput(half[i], half[-1 - i]) for i in range(2 * batch)]
    enc = [rm.encode(x) for x in items]
    n_tokens = statistics.mean(len(e) for e in enc)
    inputs = rm.collate(enc)

    opt = torch.optim.AdamW(rm.model.parameters(), lr=1e-5)
    rm.model.train()
    times = []
    for i in range(steps + 1):  # first step is warm-up
        t = time.perf_counter()
        r = rm.model(**inputs).logits[:, 0]
        loss = pairwise_loss(r[0::2], r[1::2])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.perf_counter() - t)
    train_step = statistics.median(times)

    rm.model.eval()
    rm.forward(enc)  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        rm.forward(enc)
        times.append(time.perf_counter() - t)
    infer = statistics.median(times)
    return {
        "backbone": backbone,
        "threads": threads,
        "seq_len": round(n_tokens, 1),
        "train_batch_pairs": batch,
        "train_pairs_per_s": batch / train_step,
        "train_seqs_per_s": 2 * batch / train_step,
        "infer_batch": 2 * batch,
        "infer_seqs_per_s": 2 * batch / infer,
        "train_step_s": train_step,
        "infer_batch_s": infer,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="pairs per training step (inference: 2x sequences)")
    ap.add_argument(
        "--threads", default="1,2", help="comma-separated torch thread counts; the first is the baseline"
    )
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    rows = [run(args.backbone, args.seq_len, args.batch, int(t), args.steps) for t in args.threads.split(",")]
    base = rows[0]
    print(
        f"{'threads':>7} {'tokens':>6} {'train pairs/s':>13} {'train seq/s':>11} {'infer seq/s':>11} "
        f"{'x train':>7} {'x infer':>7}"
    )
    for r in rows:
        print(
            f"{r['threads']:>7} {r['seq_len']:>6} {r['train_pairs_per_s']:>13.1f} {r['train_seqs_per_s']:>11.1f} "
            f"{r['infer_seqs_per_s']:>11.1f} {r['train_pairs_per_s'] / base['train_pairs_per_s']:>7.2f} "
            f"{r['infer_seqs_per_s'] / base['infer_seqs_per_s']:>7.2f}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
