"""Held-out prompts for the generation side effects (length, distinct-n, repetition, reward).

Default: requests from the Stanford Politeness Corpus (Wikipedia + Stack Exchange; non-Reddit text) in a
fixed hash hold-out: a request is held out for evaluation when `sha256("{Community}:{Id}")` falls in the
bucket `is_heldout` names (1 in 10). Anything that trains a policy on politeness requests (the
"non-Reddit prompts" condition of the experiment) must skip those rows: call `is_heldout(community, id)`.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

POLITENESS_FILES = ("wikipedia.annotated.csv", "stack-exchange.annotated.csv")
HELDOUT_BUCKETS = 10


def _bucket_hash(community: str, row_id: str) -> int:
    return int(hashlib.sha256(f"{community}:{row_id}".encode()).hexdigest()[:12], 16)


def is_heldout(community: str, row_id: str | int) -> bool:
    """True for the politeness requests reserved for evaluation (never train a policy on them)."""
    return _bucket_hash(community, str(row_id)) % HELDOUT_BUCKETS == 0


def politeness_heldout(data_dir: Path, n: int) -> list[str]:
    """The first `n` held-out requests in hash order (a fixed, corpus-mixed sample)."""
    rows = []
    for name in POLITENESS_FILES:
        path = Path(data_dir) / "eval" / "politeness" / name
        if not path.exists():
            raise FileNotFoundError(f"politeness corpus file not found: {path}")
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if not {"Community", "Id", "Request"} <= row.keys():
                    raise ValueError(f"{path}: expected columns Community, Id, Request")
                if is_heldout(row["Community"], row["Id"]) and row["Request"].strip():
                    rows.append((_bucket_hash(row["Community"], row["Id"]), row["Request"].strip()))
    rows.sort()
    return [text for _, text in rows[:n]]


def load_prompts(
    prompts: Sequence[str] | str | Path | None, data_dir: Path, n: int = 32
) -> tuple[list[str], str]:
    """(prompts, source): a list as given, a file (one prompt per line, or JSONL with a "prompt" field), or the
    politeness hold-out."""
    if prompts is None:
        return politeness_heldout(data_dir, n), f"politeness hold-out ({n} requests)"
    if isinstance(prompts, (str, Path)):
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file not found: {path}")
        texts = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise ValueError(f"{path}: line {i + 1} has no string field 'prompt'")
                texts.append(row["prompt"])
            else:
                texts.append(line.replace("\\n", "\n"))
        source = str(path)
    else:
        texts, source = [str(p) for p in prompts], "prompts argument"
    if not texts:
        raise ValueError(f"no prompts in {source}")
    return texts, source
