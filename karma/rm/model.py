"""The saved reward-model folder and the one scoring path every consumer uses.

A KARMA reward-model folder is a standard Hugging Face folder (`save_pretrained` of an
`AutoModelForSequenceClassification` with `num_labels=1`, plus its tokenizer) and a `karma_rm.json`
(`KarmaRMConfig`). Training (`karma rm train`), the reward service, the trainer's in-process reward and
the evaluation all score through `RewardModel`, so a text gets the same score everywhere.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from karma.chat import CHATML_TEMPLATE
from karma.progress import Progress
from karma.rm.folder import CONFIG_NAME, KarmaRMConfig, MissingRMConfigError
from karma.rm.template import VARIANTS, render

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from karma.rm.rule import RuleRewardModel


@dataclass
class RMInput:
    """One item to score. `context` may be a str or a list of turns (str or {role, content})."""

    context: Any
    response: str
    metadata: Mapping[str, Any] | None = None


@dataclass
class Encoded:
    """One tokenised item: the model's input ids (and token type ids where the backbone has them)."""

    input_ids: list[int]
    token_type_ids: list[int] | None = None
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


#: characters kept per token of max_length before tokenising (English Reddit text averages ~4 per token)
CHARS_PER_TOKEN = 16


def keep_chars(text: str, n: int, side: Literal["start", "end"]) -> tuple[str, bool]:
    """(text cut to about `n` characters keeping its start or end, whether it was cut). The cut moves to the
    nearest whitespace within 64 characters (into the dropped part is not possible), so no word is split
    where one can be kept whole; the whitespace itself is kept (byte-level BPE attaches it to the word)."""
    if len(text) <= n:
        return text, False
    if side == "start":
        head = text[:n]
        ws = max(head.rfind(" ", n - 64), head.rfind("\n", n - 64))
        return (head[:ws] if ws > 0 else head), True
    tail = text[-n:]
    hits = [i for i in (tail.find(" ", 0, 64), tail.find("\n", 0, 64)) if i >= 0]
    return (tail[min(hits) :] if hits else tail), True


class InputTooLongError(ValueError):
    """Raised by encode(truncate=False) when an item exceeds max_length."""


class RewardModel:
    """A loaded KARMA reward model: tokenise with its template, forward in batches, return float scores."""

    def __init__(self, model, tokenizer, config: KarmaRMConfig, device: str = "cpu"):
        import torch

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        self._tok_lock = threading.Lock()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id

    # ----------------------------------------------------------------------------------- loading / saving
    @classmethod
    def load(
        cls, path: str | Path, device: str = "cpu", dtype: str | None = None
    ) -> RewardModel | RuleRewardModel:
        """Load a reward-model folder. A rule folder (`karma_rule.json`, see `karma.rm.rule`) loads as a
        `RuleRewardModel`, which has the same scoring interface (encode / forward / score / normalize)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"reward model folder does not exist: {path}")
        from karma.rm.rule import RULE_CONFIG_NAME, RuleRewardModel

        if (path / RULE_CONFIG_NAME).is_file():
            return RuleRewardModel.load(path)
        from karma.rm.compose import COMPOSE_CONFIG_NAME

        if (path / COMPOSE_CONFIG_NAME).is_file():
            raise ValueError(
                f"{path} is a composed reward ({COMPOSE_CONFIG_NAME}): it has no weights of its own and scores "
                "through other served models; serve it beside its components (`karma serve --model NAME=PATH`)"
            )
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        cfg_file = path / CONFIG_NAME
        if not cfg_file.exists():
            raise MissingRMConfigError(
                f"{path} is not a KARMA reward model: {CONFIG_NAME} is missing (train one with `karma rm train`)"
            )
        config = KarmaRMConfig.model_validate_json(cfg_file.read_text())
        torch_dtype = {
            None: torch.float32,
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
            "float64": torch.float64,
        }[dtype]
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model.to(device), tokenizer, config, device=device)

    def save(self, path: str | Path) -> Path:
        """Write the folder. The tokenizer always has a chat template (ChatML if the backbone has none),
        saved as `chat_template` in tokenizer_config.json, where every transformers version and the
        tokenizer-level integrations (vLLM pooling, verl's reward-model path) find it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        if not getattr(self.tokenizer, "chat_template", None):
            self.tokenizer.chat_template = CHATML_TEMPLATE
        self.tokenizer.save_pretrained(path, save_jinja_files=False)
        (path / "chat_template.jinja").unlink(missing_ok=True)  # an older save's copy would take precedence
        h = hashlib.sha256()
        for f in sorted(path.glob("*.safetensors")):
            h.update(f.read_bytes())
        h.update(self.config.model_dump_json(exclude={"version", "metrics"}).encode())
        self.config.version = h.hexdigest()[:12]
        (path / CONFIG_NAME).write_text(self.config.model_dump_json(indent=2))
        return path

    @property
    def version(self) -> str:
        return self.config.version

    @property
    def max_length(self) -> int:
        limit = getattr(self.model.config, "max_position_embeddings", None) or self.config.max_length
        return min(self.config.max_length, int(limit))

    # ----------------------------------------------------------------------------------- tokenising
    def encode(self, item: RMInput, truncate: bool = True) -> Encoded:
        """Render with the variant's template and tokenise; truncate the context from the left only.

        Only when the response alone exceeds max_length is the response cut (from the right, context
        dropped). Before tokenising, each segment is cut to `CHARS_PER_TOKEN × max_length` characters from
        the side truncation keeps (the context's end, the response's start), at a whitespace, so a huge text
        costs what a long one does; natural text has far fewer characters per token, so its tokens are the
        same as without the cut. An item cut this way is `truncated`. Thread-safe: the fast tokenizer's
        truncation state is shared, so tokenising is serialised (on at most ~2 × that many characters).
        """
        seg_a, seg_b = render(self.config.variant, item.context, item.response, item.metadata)
        tok, limit = self.tokenizer, self.max_length
        window = CHARS_PER_TOKEN * limit
        seg_a, cut_a = keep_chars(seg_a, window, "end")
        seg_b, cut_b = keep_chars(seg_b, window, "start")
        with self._tok_lock:
            n_a = len(tok(seg_a, add_special_tokens=False, verbose=False)["input_ids"]) if seg_a else 0
            n_b = len(tok(seg_b, add_special_tokens=False, verbose=False)["input_ids"])
            n_special = tok.num_special_tokens_to_add(pair=bool(seg_a))
            overflow = n_a + n_b + n_special > limit
            truncated = overflow or cut_a or cut_b
            if truncated and not truncate:
                raise InputTooLongError(
                    f"input is {n_a + n_b + n_special} tokens, longer than the model's max_length {limit}"
                    if overflow
                    else f"input has over {window} characters in a segment, more than the model's max_length "
                    f"{limit} can use"
                )
            if not overflow:
                enc = tok(seg_a, seg_b, verbose=False) if seg_a else tok(seg_b, verbose=False)
            elif n_b + n_special >= limit or not seg_a:  # no room left for even one context token
                tok.truncation_side = "right"
                enc = tok(seg_b, truncation=True, max_length=limit)
            else:
                tok.truncation_side = self.config.truncation_side
                enc = tok(seg_a, seg_b, truncation="only_first", max_length=limit)
        types = enc.get("token_type_ids") if "token_type_ids" in tok.model_input_names else None
        return Encoded(input_ids=list(enc["input_ids"]), token_type_ids=types, truncated=truncated)

    # ----------------------------------------------------------------------------------- forward
    def collate(self, batch: Sequence[Encoded]) -> dict[str, Any]:
        """Right-pad a batch into tensors (the model reads the last non-pad token / CLS as appropriate)."""
        import torch

        n = max(len(e) for e in batch)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(batch), n), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        types = torch.zeros((len(batch), n), dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, : len(e)] = torch.tensor(e.input_ids)
            mask[i, : len(e)] = 1
            if e.token_type_ids is not None:
                types[i, : len(e)] = torch.tensor(e.token_type_ids)
        out = {"input_ids": ids, "attention_mask": mask}
        if batch[0].token_type_ids is not None:
            out["token_type_ids"] = types
        return out

    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        """Scores for already-encoded items, in order. Safe to call from a worker thread."""
        import torch

        if not batch:
            return []
        inputs = {k: v.to(self.device) for k, v in self.collate(batch).items()}
        with torch.inference_mode():
            logits = self.model(**inputs).logits
        scores = logits[:, 0]
        return (scores if scores.dtype == torch.float64 else scores.float()).cpu().tolist()

    def score(
        self,
        items: Sequence[RMInput],
        *,
        normalize: bool = False,
        batch_size: int = 32,
        truncate: bool = True,
        progress: str | None = None,
    ) -> list[float]:
        """Score items offline: length-sorted batches, results returned in input order. `progress`: log a
        line with this name at most every 10 s (`karma.progress`)."""
        enc = [self.encode(it, truncate=truncate) for it in items]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
        scores = [0.0] * len(enc)
        bar = Progress(log, progress, len(enc), "texts") if progress else None
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, s in zip(idx, self.forward([enc[i] for i in idx]), strict=True):
                scores[i] = s
            if bar is not None:
                bar.update(len(idx))
        return self.normalize(scores) if normalize else scores

    def normalize(self, scores: Sequence[float]) -> list[float]:
        n = self.config.score_normalization
        std = n.std if n.std > 1e-8 else 1.0
        return [(s - n.mean) / std for s in scores]


def new_reward_model(
    backbone: str, variant: str, *, max_length: int = 256, device: str = "cpu", **config: Any
) -> RewardModel:
    """A fresh RM (random 1-unit head) on a backbone path / hub id, ready for training."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
    cfg = KarmaRMConfig(variant=variant, backbone=str(backbone), max_length=max_length, **config)
    return RewardModel(model.to(device), tokenizer, cfg, device=device)
