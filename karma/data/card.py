"""The dataset card written beside the prepared data: card.json (machine) and card.md (people)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from karma.rm.template import TEMPLATE_VERSION

CARD_VERSION = 1
#: skip reasons that mean broken input rather than a filter doing its job (they raise a warning)
BAD_INPUT_PREFIXES = (
    "not_json",
    "not_utf8",
    "truncated_frame",
    "missing_field:",
    "bad_field:",
    "out_of_range:",
)


def config_dict(cfg) -> dict[str, Any]:
    """The options of a run (a `PrepareConfig`) as the card records them, with the time of writing."""
    d = cfg.model_dump()
    d["created_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return d


def _merge(dicts) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def _mode(sources: dict[str, int]) -> str:
    """comments | submissions | shp | mixed: where the examples came from."""
    names = {"pushshift": "comments", "submissions": "submissions", "shp": "shp"}
    present = [names[s] for s in sources if sources[s]]
    return present[0] if len(present) == 1 else "mixed"


def build_card(
    cfg, file_stats, summary: dict[str, Any], timings: dict[str, float], posts_are_examples: bool
) -> dict:
    inputs = []
    for s in file_stats:
        entry = s.to_card()
        entry["role"] = "examples" if (s.kind != "submissions" or posts_are_examples) else "context"
        inputs.append(entry)
    skipped = _merge(s.skipped for s in file_stats)
    cleaned = _merge(s.cleaned for s in file_stats)
    skipped_files: dict[str, int] = {}
    for s in file_stats:
        if s.status in ("empty_file", "not_zstd"):
            skipped_files[s.status] = skipped_files.get(s.status, 0) + 1
    lines_read = sum(s.lines_read for s in file_stats)
    kept = sum(s.kept for s in file_stats)
    assert kept + sum(skipped.values()) == lines_read  # holds per file by construction; summed here
    warnings = []
    for s in file_stats:
        bad = {k: v for k, v in s.skipped.items() if k.startswith(BAD_INPUT_PREFIXES)}
        if s.status != "ok":
            warnings.append(f"{s.path}: {s.status} ({s.error})")
        if bad:
            warnings.append(
                f"{s.path}: skipped bad records: " + ", ".join(f"{k} {v}" for k, v in sorted(bad.items()))
            )
        if s.cleaned:
            warnings.append(
                f"{s.path}: records with repaired text: "
                + ", ".join(f"{k} {v}" for k, v in sorted(s.cleaned.items()))
                + " (each lone surrogate replaced by U+FFFD)"
            )
    filters = {
        "drop_deleted": cfg.drop_deleted,
        "drop_bots": cfg.drop_bots,
        "drop_moderator": cfg.drop_moderator,
        "drop_stickied": cfg.drop_stickied,
        "drop_missing_context": cfg.drop_missing_context,
        "min_score_ratio": cfg.min_score_ratio,
        "min_pair_score": cfg.min_pair_score,
        "max_pairs_per_parent": cfg.max_pairs_per_parent,
        "pair_order": cfg.pair_order,
        "limit": cfg.limit,
    }
    return {
        "card_version": CARD_VERSION,
        "mode": _mode(summary.get("sources", {})),
        "inputs": inputs,
        "lines_read": lines_read,
        "kept": kept,
        "skipped": skipped,
        "cleaned": cleaned,  # rows written with their text repaired (karma.data.decode)
        "skipped_files": skipped_files,
        "filters": filters,
        **summary,
        "config": config_dict(cfg),
        "template_version": TEMPLATE_VERSION,
        "timings": timings,
        "elapsed_seconds": timings.get("total"),
        "warnings": warnings,
    }


def card_markdown(card: dict) -> str:
    lines = [
        "# Prepared KARMA data",
        "",
        (
            f"{card['examples']:,} examples in {card['threads']:,} threads ({card['subreddits']} subreddits), "
            f"{card['pairs']['total']:,} pairs; {card['lines_read']:,} lines read, {card['kept']:,} kept; "
            f"{card['elapsed_seconds']} s."
        ),
        "",
        "| split | examples | threads | pairs |",
        "|---|---:|---:|---:|",
    ]
    for name, s in card["splits"].items():
        lines.append(f"| {name} | {s['examples']:,} | {s['threads']:,} | {s['pairs']:,} |")
    lines += [
        "",
        "## Inputs",
        "",
        "| file | kind | sha256 | lines | kept | status |",
        "|---|---|---|---:|---:|---|",
    ]
    for f in card["inputs"]:
        lines.append(
            f"| {Path(f['path']).name} | {f['kind']} ({f['role']}) | `{f['sha256'][:12]}` | {f['lines_read']:,} "
            f"| {f['kept']:,} | {f['status']} |"
        )
    lines += ["", "## Skipped", ""]
    lines += [f"- {k}: {v:,}" for k, v in card["skipped"].items()] or ["- none"]
    lines += [f"- file {k}: {v}" for k, v in card["skipped_files"].items()]
    if card.get("cleaned"):
        lines += ["", "## Cleaned (written, text repaired)", ""]
        lines += [
            f"- {k}: {v:,} (each lone surrogate replaced by U+FFFD)" for k, v in card["cleaned"].items()
        ]
    sc = card["score"]
    lines += [
        "",
        "## Scores",
        "",
        (
            f"raw score min {sc['min']}, median {sc['median']}, mean {sc['mean']:.2f}, max {sc['max']}; "
            f"karma = {card['config']['normalize']} (mean {card['karma']['mean']:.3f}, "
            f"std {card['karma']['std']:.3f}). {card['context_missing']:,} examples have part of their context missing."
        ),
        "",
        "## Config",
        "",
        "```json",
        json.dumps(card["config"], indent=2),
        "```",
    ]
    if card["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in card["warnings"]]
    return "\n".join(lines) + "\n"


def write_card(card: dict, folder: Path) -> None:
    (folder / "card.json").write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    (folder / "card.md").write_text(card_markdown(card))
