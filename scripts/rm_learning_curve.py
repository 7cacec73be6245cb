"""The reward model's learning curve on the college data: which training choices buy accuracy on a CPU.

    .venv/bin/python scripts/rm_learning_curve.py --later DATA_LATER --any DATA_ANY --zscore DATA_Z \
        --out runs/rm-curve [--points NAME,...] [--eval-split val] [--eval-only]

DATA_* are `karma data prepare` folders of the same dumps: `--pair-order later` (the old default),
`--pair-order any` (both posting orders), and `--normalize zscore` (karma standardised within each thread,
for the regression objective). Every point trains the `context` RM (MiniLM) into OUT/<point>/ — skipped when
it exists, so the script resumes — and records its wall time. Then every finished point and the baselines
are scored on the same rows of `--eval-split` (val by default: the defaults are chosen there, the test split
is kept for the chosen one) and OUT/curve.json, OUT/curve.md and OUT/curve.png are written.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("rm_learning_curve")

#: name -> (data folder key, training options); ordered by what each point tells
POINTS: dict[str, tuple[str, dict]] = {
    "later-pairwise-1000": ("later", {"objective": "pairwise", "max_train": 1000}),
    "any-pairwise-1000": ("any", {"objective": "pairwise", "max_train": 1000}),
    "any-pairwise-500": ("any", {"objective": "pairwise", "max_train": 500}),
    "zscore-regression-4000": ("zscore", {"objective": "regression", "max_train": 4000}),
    "any-pairwise-2000": ("any", {"objective": "pairwise", "max_train": 2000}),
    "any-pairwise-2000-lr1e-4": ("any", {"objective": "pairwise", "max_train": 2000, "learning_rate": 1e-4}),
    "any-pairwise-4000": ("any", {"objective": "pairwise", "max_train": 4000}),
    "zscore-regression-16000": ("zscore", {"objective": "regression", "max_train": 16000}),
}
COMMON = {
    "variant": "context",
    "max_length": 128,
    "epochs": 1,
    "batch_size": 16,
    "max_eval": 200,
    "seed": 0,
    "progress": False,
}


def items(name: str) -> int:
    return POINTS[name][1]["max_train"]


def train(points: list[str], dirs: dict[str, Path], out: Path) -> None:
    from karma.rm.train import train_rm

    for name in points:
        dest = out / name
        if (dest / "karma_rm.json").exists():
            continue
        key, opts = POINTS[name]
        t0 = time.perf_counter()
        train_rm(dirs[key], dest, **{**COMMON, **opts})
        (dest / "curve_point.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "data": str(dirs[key]),
                    **COMMON,
                    **opts,
                    "train_s": round(time.perf_counter() - t0, 1),
                }
            )
        )
        log.info("trained %s in %.0fs", name, time.perf_counter() - t0)


def evaluate(out: Path, data: Path, split: str, max_set_pairs: int) -> dict:
    from karma.rm.evaluate import evaluate_rm
    from karma.rm.model import RewardModel

    done = [n for n in POINTS if (out / n / "karma_rm.json").exists()]
    models = [RewardModel.load(out / n) for n in done]
    r = evaluate_rm(
        models,
        data,
        split,
        out / f"eval-{split}",
        max_examples=600,
        max_pairs=400,
        pair_sets=["natural", "length_controlled", "close_in_time", "rule"],
        max_set_pairs=max_set_pairs,
    )
    names = list(r["systems"])  # rm:context, rm:context', ... in `done` order, then the baselines
    rows = []
    for n, sysname in zip(done, names, strict=False):
        meta = json.loads((out / n / "curve_point.json").read_text())
        row = {
            "point": n,
            "system": sysname,
            "items": meta["max_train"],
            "objective": meta["objective"],
            "pairs": POINTS[n][0],
            "lr": meta.get("learning_rate", 5e-5),
            "train_s": meta["train_s"],
        }
        for s, d in r["pair_sets"]["sets"].items():
            row[s] = d["systems"][sysname]
            row[f"{s} - length"] = d["paired"].get(f"{sysname} - length")
            row[f"{s} - bow_ridge"] = d["paired"].get(f"{sysname} - bow_ridge")
        row["spearman"] = r["pair_sets"]["spearman"][sysname]
        rows.append(row)
    base = {
        b: {s: d["systems"][b] for s, d in r["pair_sets"]["sets"].items()}
        | {"spearman": r["pair_sets"]["spearman"][b]}
        for b in ("length", "bow_ridge", "earliness")
        if b in r["systems"]
    }
    result = {
        "split": split,
        "sets": {
            s: {k: v for k, v in d.items() if k not in ("systems", "paired")}
            for s, d in r["pair_sets"]["sets"].items()
        },
        "points": rows,
        "baselines": base,
    }
    (out / "curve.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out / "curve.md")
    plot(result, out / "curve.png")
    return result


def _c(d) -> str:
    return (
        "—" if not d or d.get("accuracy") is None else f"{d['accuracy']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"
    )


def _p(d) -> str:
    return "—" if not d or d.get("diff") is None else f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def write_markdown(result: dict, path: Path) -> None:
    sets = result["sets"]
    lines = [
        f"Split `{result['split']}`; pairs per set: " + ", ".join(f"`{s}` {d['n']}" for s, d in sets.items()),
        "",
        (
            "| point | pairs | objective | items | lr | train s | length_controlled | Δ vs length | Δ vs bow | natural "
            "| Δ vs length | close_in_time | rule | Spearman |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["points"]:
        sp = r["spearman"]
        lines.append(
            f"| {r['point']} | {r['pairs']} | {r['objective']} | {r['items']} | {r['lr']:g} | {r['train_s']:.0f} | "
            f"{_c(r.get('length_controlled'))} | {_p(r.get('length_controlled - length'))} | "
            f"{_p(r.get('length_controlled - bow_ridge'))} | {_c(r.get('natural'))} | "
            f"{_p(r.get('natural - length'))} | {_c(r.get('close_in_time'))} | {_c(r.get('rule'))} | "
            f"{sp['spearman']:.3f} |"
        )
    for b, d in result["baselines"].items():
        lines.append(
            f"| baseline `{b}` | | | | | | {_c(d.get('length_controlled'))} | | | {_c(d.get('natural'))} | | "
            f"{_c(d.get('close_in_time'))} | {_c(d.get('rule'))} | {d['spearman']['spearman']:.3f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, s in zip(axes, ("length_controlled", "natural"), strict=False):
        for kind, style in (("pairwise", "o-"), ("regression", "s--")):
            for pairs in ("any", "later", "zscore"):
                pts = sorted(
                    (
                        r
                        for r in result["points"]
                        if r["objective"] == kind and r["pairs"] == pairs and r["lr"] == 5e-5 and r.get(s)
                    ),
                    key=lambda r: r["items"],
                )
                if not pts:
                    continue
                x = [r["items"] for r in pts]
                y = [r[s]["accuracy"] for r in pts]
                err = [
                    [r[s]["accuracy"] - r[s]["lo"] for r in pts],
                    [r[s]["hi"] - r[s]["accuracy"] for r in pts],
                ]
                ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=f"{kind} ({pairs} pairs)")
        for b, color in (("length", "grey"), ("bow_ridge", "tab:red")):
            if s in result["baselines"].get(b, {}):
                ax.axhline(result["baselines"][b][s]["accuracy"], color=color, ls=":", label=f"baseline {b}")
        ax.axhline(0.5, color="black", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("training items (pairs, or comments for regression)")
        ax.set_title(f"`{s}` {result['split']} pairs (n = {result['sets'][s]['n']})", fontsize=10)
    axes[0].set_ylabel("pairwise accuracy [95 % CI]")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--later", type=Path, required=True)
    ap.add_argument("--any", type=Path, required=True)
    ap.add_argument("--zscore", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/rm-curve"))
    ap.add_argument("--points", default=",".join(POINTS))
    ap.add_argument("--eval-split", default="val")
    ap.add_argument("--max-set-pairs", type=int, default=1000)
    ap.add_argument("--eval-only", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    points = [p for p in args.points.split(",") if p]
    unknown = [p for p in points if p not in POINTS]
    if unknown:
        ap.error(f"unknown point(s) {', '.join(unknown)}; known: {', '.join(POINTS)}")
    if not args.eval_only:
        train(points, {"later": args.later, "any": args.any, "zscore": args.zscore}, args.out)
    result = evaluate(args.out, args.any, args.eval_split, args.max_set_pairs)
    print((args.out / "curve.md").read_text())
    del result


if __name__ == "__main__":
    main()
