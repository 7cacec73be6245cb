"""Prompt sources (`--prompts`) and the seeded, resumable order in which prompts are drawn.

- `reddit:DIR` — the `examples.parquet` of `karma data prepare` (architecture.md section 1): one prompt per
  distinct `context` of the chosen split; the RM context is that `context`, the metadata (subreddit, depth,
  times, siblings) of its first example is passed to the RM (the `full` variant reads it). The policy is
  exposed to Reddit text.
- `file:PATH` — JSONL (objects or strings) or CSV; the prompt column is `prompt_field` or the first of
  `prompt, context, Request, question, text`. E.g. the politeness corpus requests (never Reddit).

Each prompt keeps two fields: `context` (what the reward model sees) and the policy prompt rendered with the
policy tokenizer's chat template (`prompt_text`, `prompt_ids`), rendered when a step first draws it
(`PromptPool`); its metadata is validated as the wire's `karma.protocol.Metadata` then, once, and every
reply to it is scored as `prompt.score_item(reply)`. `load_prompt_sets` also sets aside the held-out prompts
of the end-of-run evaluation.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from pydantic import ValidationError

from karma.protocol import Metadata, ScoreItem
from karma.rm.template import METADATA_KEYS

FIELD_CANDIDATES = ("prompt", "context", "Request", "question", "text")
METADATA_COLUMNS = METADATA_KEYS  # the columns of examples.parquet the `full` variant reads


class PromptSourceError(ValueError):
    """A prompt source that cannot be read or holds no prompts."""


@dataclass
class PromptRecord:
    context: str  # the reward model's context
    metadata: dict[str, Any] | None = None


@dataclass
class Prompt:
    context: str  # the reward model's context (full text; the RM truncates from the left itself)
    prompt_text: str  # the policy's chat-template rendering (context possibly cut from the left)
    prompt_ids: list[int]
    metadata: dict[str, Any] | None = None
    #: `metadata` as the wire type: validated and made plain (numpy scalars, NaN -> null) once, here
    rm_metadata: Metadata | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            self.rm_metadata = Metadata.model_validate(self.metadata) if self.metadata else None
        except ValidationError as exc:
            raise PromptSourceError(
                f"invalid metadata {self.metadata!r} of prompt {self.context[:60]!r}: {exc}"
            ) from exc

    def score_item(self, response: str) -> ScoreItem:
        """The reward-model item of `response` to this prompt (the one item type of the reward path)."""
        return ScoreItem(context=self.context, response=response, metadata=self.rm_metadata)


def load_records(
    spec: str, *, split: str = "train", prompt_field: str | None = None, max_prompts: int | None = None
) -> list[PromptRecord]:
    """Read a prompt source spec ('reddit:DIR' | 'file:PATH')."""
    kind, _, location = spec.partition(":")
    path = Path(location).expanduser()
    if kind == "reddit":
        records = _reddit_records(path, split)
    elif kind == "file":
        records = _file_records(path, prompt_field)
    else:
        raise PromptSourceError(f"prompt source must be 'reddit:DIR' or 'file:PATH', got {spec!r}")
    if not records:
        where = f"split {split!r} of {path / 'examples.parquet'}" if kind == "reddit" else str(path)
        raise PromptSourceError(f"no prompts in {where}")
    return records[:max_prompts] if max_prompts else records


def _reddit_records(folder: Path, split: str) -> list[PromptRecord]:
    import pyarrow.parquet as pq

    file = folder / "examples.parquet"
    if not file.is_file():
        raise PromptSourceError(f"{file} not found (make it with `karma data prepare --out {folder}`)")
    available = set(pq.read_schema(file).names)
    if "context" not in available or "split" not in available:
        raise PromptSourceError(f"{file} lacks the 'context'/'split' columns of `karma data prepare` output")
    columns = ["context", "split", *[c for c in METADATA_COLUMNS if c in available]]
    table = pq.read_table(file, columns=columns, filters=[("split", "=", split)])
    seen: set[str] = set()
    out = []
    for row in table.to_pylist():
        ctx = (row["context"] or "").strip()
        if not ctx or ctx in seen:
            continue
        seen.add(ctx)
        meta = {c: row[c] for c in METADATA_COLUMNS if c in row}
        out.append(PromptRecord(ctx, meta or None))
    return out


def _file_records(path: Path, prompt_field: str | None) -> list[PromptRecord]:
    if not path.is_file():
        raise PromptSourceError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    rows: list[Any]
    if suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise PromptSourceError(f"{path}:{n}: not a JSON line ({exc.msg})") from exc
    elif suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    else:
        raise PromptSourceError(f"{path}: unsupported prompt file type {suffix!r} (use .jsonl or .csv)")
    out = []
    key = prompt_field
    for row in rows:
        if isinstance(row, str):
            text = row
        elif isinstance(row, dict):
            if key is None:
                key = next((k for k in FIELD_CANDIDATES if k in row), None)
                if key is None:
                    raise PromptSourceError(
                        f"{path}: no prompt column among {', '.join(FIELD_CANDIDATES)} "
                        f"(columns: {', '.join(row)}); set prompt_field"
                    )
            if key not in row:
                raise PromptSourceError(f"{path}: no column {key!r} (columns: {', '.join(row)})")
            text = row[key]
        else:
            raise PromptSourceError(f"{path}: each line must be a JSON object or string")
        text = (text or "").strip() if isinstance(text, str) else ""
        if text:
            out.append(PromptRecord(text, None))
    return out


def render_prompt(
    tokenizer, context: str, *, system_prompt: str | None, max_length: int
) -> tuple[str, list[int]]:
    """The policy prompt: chat template (user turn = context) with the generation prompt; if longer than
    `max_length` tokens, the oldest context tokens are dropped until it fits."""

    def build(text: str) -> tuple[str, list[int]]:
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            messages.append({"role": "user", "content": text})
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            rendered = (system_prompt + "\n\n" if system_prompt else "") + text + "\n"
        return rendered, tokenizer(rendered, add_special_tokens=False)["input_ids"]

    rendered, ids = build(context)
    if len(ids) <= max_length:
        return rendered, ids
    ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    overhead = len(ids) - len(ctx_ids)
    keep = max_length - overhead
    for _ in range(8):  # re-tokenising a cut text can shift a few tokens; tighten until it fits
        if keep <= 0:
            raise PromptSourceError(
                f"max_prompt_length {max_length} is shorter than the chat template itself ({overhead} tokens)"
            )
        rendered, ids = build(tokenizer.decode(ctx_ids[-keep:]).strip())
        if len(ids) <= max_length:
            return rendered, ids
        keep -= len(ids) - max_length
    raise PromptSourceError(f"could not fit a prompt into {max_length} tokens")


class PromptPool(Sequence[Prompt]):
    """Prompt records rendered into policy prompts on first use, then cached.

    Rendering (chat template + tokenising, and cutting long contexts) costs about a millisecond a prompt;
    rendering a whole Reddit split eagerly took minutes before step 1, while a run draws only
    `steps * prompts_per_step` of them.
    """

    def __init__(
        self, records: Sequence[PromptRecord], tokenizer, *, system_prompt: str | None, max_length: int
    ):
        self.records = list(records)
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_length = max_length
        self._cache: dict[int, Prompt] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def rendered(self) -> int:
        """How many prompts have been rendered so far."""
        return len(self._cache)

    @overload
    def __getitem__(self, index: int) -> Prompt: ...
    @overload
    def __getitem__(self, index: slice) -> list[Prompt]: ...

    def __getitem__(self, index: int | slice) -> Prompt | list[Prompt]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = index + len(self) if index < 0 else index
        if not 0 <= i < len(self):
            raise IndexError(f"prompt index {index} out of range for {len(self)} prompts")
        prompt = self._cache.get(i)
        if prompt is None:
            rec = self.records[i]
            text, ids = render_prompt(
                self.tokenizer, rec.context, system_prompt=self.system_prompt, max_length=self.max_length
            )
            prompt = self._cache[i] = Prompt(rec.context, text, ids, rec.metadata)
        return prompt


def build_prompts(
    records: Sequence[PromptRecord], tokenizer, *, system_prompt: str | None, max_length: int
) -> PromptPool:
    """The policy prompts of `records`, rendered lazily (see `PromptPool`)."""
    return PromptPool(records, tokenizer, system_prompt=system_prompt, max_length=max_length)


@dataclass
class PromptSets:
    train: list[PromptRecord]
    heldout: list[PromptRecord]
    heldout_source: str  # where the held-out prompts come from (heldout_reward.json "source")


def load_prompt_sets(
    spec: str,
    *,
    split: str = "train",
    prompt_field: str | None = None,
    max_prompts: int | None = None,
    heldout: int = 0,
    heldout_split: str = "val",
    heldout_seed: int = 0,
) -> PromptSets:
    """Training prompts and up to `heldout` held-out prompts that are never training prompts.

    - `reddit:DIR`: a seeded sample of `heldout_split` (threads never in two splits; a context that also
      occurs in the training split is left out anyway).
    - `file:PATH`: a seeded sample of the file (at most half of it), removed from the training prompts
      together with every duplicate of its texts.
    """
    import random

    if not heldout:
        return PromptSets(
            load_records(spec, split=split, prompt_field=prompt_field, max_prompts=max_prompts), [], ""
        )
    kind = spec.partition(":")[0]
    rng = random.Random(heldout_seed)
    if kind == "reddit":
        train = load_records(spec, split=split, prompt_field=prompt_field)
        seen = {r.context for r in train}
        pool = [
            r
            for r in load_records(spec, split=heldout_split, prompt_field=prompt_field)
            if r.context not in seen
        ]
        if not pool:
            raise PromptSourceError(
                f"split {heldout_split!r} of {spec} has no contexts outside split {split!r} "
                "for the held-out reward; set heldout_prompts: 0 to turn it off"
            )
        held = rng.sample(pool, min(heldout, len(pool)))
        source = f"{spec} split {heldout_split} ({len(held)} of {len(pool)} contexts, seed {heldout_seed})"
        return PromptSets(train[:max_prompts] if max_prompts else train, held, source)
    every = load_records(spec, split=split, prompt_field=prompt_field)
    distinct = list(dict.fromkeys(r.context for r in every))
    k = min(heldout, len(distinct) // 2)
    if k == 0:
        raise PromptSourceError(
            f"{spec} holds {len(distinct)} distinct prompt(s): too few to hold any out for the "
            "held-out reward; set heldout_prompts: 0 to turn it off"
        )
    held_texts = rng.sample(distinct, k)
    held_set = set(held_texts)
    by_text = {r.context: r for r in every}
    train = [r for r in every if r.context not in held_set]
    source = f"{spec} held-out slice ({k} of {len(distinct)} distinct prompts, seed {heldout_seed})"
    return PromptSets(train[:max_prompts] if max_prompts else train, [by_text[t] for t in held_texts], source)


class PromptSampler:
    """Seeded prompt order, reshuffled every pass; its state (pass, position) is saved in checkpoints."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        if n < 1:
            raise ValueError("PromptSampler needs at least one prompt")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        import random

        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint was made with {state['n']} prompts / seed {state['seed']}, "
                f"this run has {self.n} / {self.seed}"
            )
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._make_order()
