"""A causal LM under evaluation: check the folder, load it (full or LoRA), score continuations by
log-likelihood in padded batches, and generate replies.

Log-likelihood follows lm-evaluation-harness's `loglikelihood` request: whitespace at the end of the context
moves to the front of the continuation, the continuation's tokens are those of `tok(context + continuation)`
after the context's, and the score is the sum of their log-probabilities. No chat template and no BOS are
added (the harness's default for multiple-choice log-likelihood); a context that tokenises to nothing is
preceded by the BOS (else EOS) token so the first continuation token has something to condition on.

Batches are left-padded with explicit position ids (so a row's numbers do not depend on its batch mates) and
only the last `max continuation length` positions go through the LM head.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


class NotACausalLMError(ValueError):
    """A model folder that holds something other than a causal LM (or its LoRA adapter)."""


@dataclass(frozen=True)
class ModelSpec:
    """What `inspect_model` found: the folder to load, and the base model when it is a LoRA adapter."""

    path: str
    base: str | None = None  # set for a PEFT adapter folder
    architectures: tuple[str, ...] = ()

    @property
    def is_adapter(self) -> bool:
        return self.base is not None


def _check_config(config_file: Path, what: str) -> tuple[str, ...]:
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NotACausalLMError(f"{what}: cannot read {config_file.name} ({e})") from e
    archs = tuple(config.get("architectures") or ())
    if archs:
        if not any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
            raise NotACausalLMError(
                f"{what} is not a causal LM: config.json lists architectures {list(archs)} "
                f"(model_type {config.get('model_type')!r}); `karma eval` needs a *ForCausalLM model"
            )
        return archs
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise NotACausalLMError(
            f"{what} is not a causal LM: model_type {config.get('model_type')!r} has no causal-LM class"
        )
    return archs


def inspect_model(name_or_path: str) -> ModelSpec:
    """Resolve a policy alias / folder and check, from its config files only, that it is a causal LM.

    A PEFT adapter folder (adapter_config.json) is checked through its base model.
    """
    from karma.models import ModelNotFoundError, resolve_policy

    p = Path(name_or_path).expanduser()
    if p.is_dir() and (p / "adapter_config.json").exists():
        adapter = json.loads((p / "adapter_config.json").read_text())
        task_type = adapter.get("task_type")
        if task_type not in (None, "CAUSAL_LM"):
            raise NotACausalLMError(f"{p} is a PEFT adapter for task {task_type!r}, not a causal LM (CAUSAL_LM)")
        base_name = adapter.get("base_model_name_or_path")
        if not base_name:
            raise NotACausalLMError(f"{p}: adapter_config.json names no base_model_name_or_path")
        base = inspect_model(base_name)
        return ModelSpec(str(p.resolve()), base=base.path, architectures=base.architectures)
    try:
        path = resolve_policy(name_or_path)
    except ModelNotFoundError as e:
        if p.is_dir():  # a folder without config.json: say what it is not
            raise NotACausalLMError(f"{p} is not a causal LM folder (no config.json or adapter_config.json)") from e
        raise
    local = Path(path)
    if local.is_dir():
        return ModelSpec(path, architectures=_check_config(local / "config.json", str(local)))
    return ModelSpec(path)  # hub id: transformers checks it when loading


@dataclass(frozen=True)
class Generation:
    text: str
    n_tokens: int  # generated tokens, EOS excluded
    hit_max: bool  # stopped by max_new_tokens rather than EOS


class CausalLM:
    """A loaded causal LM + tokenizer, ready for `loglikelihood` and `generate`."""

    def __init__(self, model, tokenizer, *, name: str = "", max_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_length = int(min(max_length or limit, limit))
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._positions_arg = "position_ids" in inspect.signature(model.forward).parameters

    @property
    def device(self):
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, spec: ModelSpec | str, *, device: str = "auto", dtype: str = "auto") -> CausalLM:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(spec, str):
            spec = inspect_model(spec)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        model = AutoModelForCausalLM.from_pretrained(spec.base or spec.path, dtype=torch_dtype)
        if spec.is_adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, spec.path).merge_and_unload()
        tok_dir = spec.path if (Path(spec.path) / "tokenizer_config.json").exists() else (spec.base or spec.path)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        return cls(model.to(device), tokenizer, name=spec.path)

    # ------------------------------------------------------------------------------------- log-likelihood
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-evaluation-harness splits them."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        tok = self.tokenizer
        whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        cont = whole[len(ctx):]
        if whole[: len(ctx)] != ctx or not cont:  # the boundary merged into one token: encode separately
            cont = tok(continuation, add_special_tokens=False)["input_ids"]
        if not ctx:
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            ctx = [start]
        if not cont:
            raise ValueError(f"continuation {continuation!r} tokenises to nothing")
        return ctx, cont

    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], *, batch_size: int = 16, progress: bool = True
    ) -> list[tuple[float, int]]:
        """(summed log-probability, continuation tokens) of each (context, continuation), in input order."""
        import torch
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        encoded = []
        for context, continuation in requests:
            ctx, cont = self.encode_pair(context, continuation)
            ids = (ctx + cont)[-(self.max_length + 1):]  # cut the context from the left if too long
            cont = cont[-(len(ids) - 1):] if len(cont) >= len(ids) else cont
            encoded.append((ids[:-1], len(cont), ids[len(ids) - len(cont):]))
        # longest first: memory trouble shows at once, and similar lengths share a batch (little padding)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
        pad = self.tokenizer.pad_token_id
        device = self.device
        bar = tqdm(total=len(order), desc="scoring options", unit="opt", disable=not progress, leave=False)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i][0]) for i in idx)
            keep = max(encoded[i][1] for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                inp = encoded[i][0]
                ids[row, width - len(inp):] = torch.tensor(inp)
                mask[row, width - len(inp):] = 1
            kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            if self._positions_arg:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
            if self._keep_arg:
                kwargs["logits_to_keep"] = keep
            with torch.inference_mode():
                logits = self.model(**kwargs).logits[:, -keep:, :]
                for row, i in enumerate(idx):  # row by row: no second (batch, keep, vocab) tensor
                    _, n, target = encoded[i]
                    lg = logits[row, keep - n:, :].float()
                    picked = lg.gather(-1, torch.tensor(target, device=device)[:, None])[:, 0]
                    out[i] = (float((picked - lg.logsumexp(-1)).sum()), n)
            bar.update(len(idx))
        bar.close()
        return out

    # ------------------------------------------------------------------------------------- generation
    def format_prompt(self, prompt: str, chat_template: bool | None = None) -> str:
        """The text generation starts from: the chat template (user turn + generation prompt) when the
        tokenizer has one and `chat_template` is not False, else the prompt itself."""
        tok = self.tokenizer
        use = bool(tok.chat_template) if chat_template is None else chat_template
        if use and not tok.chat_template:
            raise ValueError(f"{self.name}: the tokenizer has no chat template")
        if not use:
            return prompt
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.7,
        top_p: float = 0.9,
        seed: int = 0,
        batch_size: int = 16,
        chat_template: bool | None = None,
        progress: bool = True,
    ) -> list[Generation]:
        """Replies in input order; sampling (temperature > 0) is seeded per batch, 0 means greedy."""
        import torch
        from tqdm.auto import tqdm

        tok = self.tokenizer
        texts = [self.format_prompt(p, chat_template) for p in prompts]
        eos = tok.eos_token_id
        out: list[Generation] = []
        for start in tqdm(range(0, len(texts), batch_size), desc="generating", disable=not progress, leave=False):
            chunk = texts[start : start + batch_size]
            enc = [tok(t, add_special_tokens=False)["input_ids"][-(self.max_length - max_new_tokens):] for t in chunk]
            width = max(len(e) for e in enc)
            ids = torch.full((len(enc), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for row, e in enumerate(enc):
                ids[row, width - len(e):] = torch.tensor(e)
                mask[row, width - len(e):] = 1
            torch.manual_seed(seed + start)
            sample = temperature > 0
            with torch.inference_mode():
                gen = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=sample,
                    temperature=temperature if sample else None,
                    top_p=top_p if sample else None,
                    top_k=None,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=eos,
                )
            for row in gen[:, width:].tolist():
                n = row.index(eos) if eos in row else len(row)
                out.append(Generation(tok.decode(row[:n], skip_special_tokens=True).strip(), n, eos not in row))
        return out
