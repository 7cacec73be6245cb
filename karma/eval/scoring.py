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
            raise NotACausalLMError(
                f"{p} is a PEFT adapter for task {task_type!r}, not a causal LM (CAUSAL_LM)"
            )
        base_name = adapter.get("base_model_name_or_path")
        if not base_name:
            raise NotACausalLMError(f"{p}: adapter_config.json names no base_model_name_or_path")
        base = inspect_model(base_name)
        return ModelSpec(str(p.resolve()), base=base.path, architectures=base.architectures)
    try:
        path = resolve_policy(name_or_path)
    except ModelNotFoundError as e:
        if p.is_dir():  # a folder without config.json: say what it is not
            raise NotACausalLMError(
                f"{p} is not a causal LM folder (no config.json or adapter_config.json)"
            ) from e
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
        tok_dir = (
            spec.path if (Path(spec.path) / "tokenizer_config.json").exists() else (spec.base or spec.path)
        )
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
        cont = whole[len(ctx) :]
        if whole[: len(ctx)] != ctx or not cont:  # the boundary merged into one token: encode separately
            cont = tok(continuation, add_special_tokens=False)["input_ids"]
        if not ctx:
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            ctx = [start]
        if not cont:
            raise ValueError(f"continuation {continuation!r} tokenises to nothing")
        return ctx, cont

    def loglikelihood(
        self,
        requests: Sequence[tuple[str, str]],
        *,
        batch_size: int = 16,
        share_prefix: bool = True,
        progress: bool = True,
    ) -> list[tuple[float, int]]:
        """(summed log-probability, continuation tokens) of each (context, continuation), in input order.

        `share_prefix` (default): each distinct context runs once and its KV cache serves all its options
        (a 3-4x saving on the eval suites, where most options share a long prompt). Otherwise every
        (context, continuation) pair is one padded row. Both give the same numbers (tests check it).
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        encoded = [self.encode_pair(c, o) for c, o in requests]
        if share_prefix:
            return self._loglik_shared(encoded, batch_size, progress)
        return self._loglik_pairs(encoded, batch_size, progress)

    def _forward_kwargs(self, ids, mask, positions=None, **extra) -> dict[str, Any]:
        device = self.device
        kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device), **extra}
        if self._positions_arg:
            if positions is None:
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
            kwargs["position_ids"] = positions.to(device)
        return kwargs

    @staticmethod
    def _sum_logprobs(logits, targets) -> float:
        """Sum of log-softmax(logits)[t] over rows; logits (n, vocab), targets n ids."""
        import torch

        lg = logits.float()
        picked = lg.gather(-1, torch.as_tensor(targets, device=lg.device)[:, None])[:, 0]
        return float((picked - lg.logsumexp(-1)).sum())

    def _loglik_pairs(self, encoded, batch_size: int, progress: bool) -> list[tuple[float, int]]:
        import torch
        from tqdm.auto import tqdm

        from karma.tensors import left_pad

        rows = []
        for ctx, cont in encoded:
            ids = (ctx + cont)[-(self.max_length + 1) :]  # cut the context from the left if too long
            n = min(len(cont), len(ids) - 1)
            rows.append((ids[:-1], n, ids[len(ids) - n :]))
        # longest first: memory trouble shows at once, and similar lengths share a batch (little padding)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
        bar = tqdm(total=len(order), desc="scoring options", unit="opt", disable=not progress, leave=False)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = left_pad([rows[i][0] for i in idx], self.tokenizer.pad_token_id)
            keep = max(rows[i][1] for i in idx)
            extra = {"logits_to_keep": keep} if self._keep_arg else {}
            with torch.inference_mode():
                logits = self.model(**self._forward_kwargs(ids, mask, **extra)).logits[:, -keep:, :]
                for row, i in enumerate(idx):  # row by row: no second (batch, keep, vocab) tensor
                    _, n, target = rows[i]
                    out[i] = (self._sum_logprobs(logits[row, keep - n :], target), n)
            bar.update(len(idx))
        bar.close()
        return out

    def _loglik_shared(self, encoded, batch_size: int, progress: bool) -> list[tuple[float, int]]:
        """Contexts in left-padded batches with a KV cache; then each context's options, in batches of rows
        that read their context's cached keys/values. Continuation token 0 is scored from the context's
        last logits, so one-token options (yes/no) need no second forward at all."""
        import torch
        from tqdm.auto import tqdm
        from transformers import DynamicCache

        from karma.tensors import left_pad, right_pad

        groups: dict[tuple[int, ...], list[int]] = {}
        conts = []
        for i, (ctx, cont) in enumerate(encoded):
            cont = cont[-self.max_length :]
            conts.append(cont)
            groups.setdefault(tuple(ctx), []).append(i)
        # a context cut from the left so that its longest option still fits in max_length
        ctx_list = [
            (list(k)[-max(self.max_length - max(len(conts[i]) for i in v) + 1, 1) :], v)
            for k, v in groups.items()
        ]
        ctx_list.sort(key=lambda g: -len(g[0]))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
        bar = tqdm(total=len(encoded), desc="scoring options", unit="opt", disable=not progress, leave=False)
        start = 0
        while start < len(ctx_list):
            chunk = ctx_list[start : start + batch_size]
            start += len(chunk)
            ids, mask = left_pad([c for c, _ in chunk], self.tokenizer.pad_token_id)
            with torch.inference_mode():
                res = self.model(
                    **self._forward_kwargs(
                        ids, mask, use_cache=True, **({"logits_to_keep": 1} if self._keep_arg else {})
                    )
                )
                layers = getattr(res.past_key_values, "layers", None)
                if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
                    # sliding-window / recurrent caches: rows of the cache are not plain per-token keys/values
                    bar.close()
                    return self._loglik_pairs(encoded, batch_size, progress)
                last = res.logits[:, -1, :]
                kv = [(layer.keys, layer.values) for layer in layers]
                ctx_len = mask.sum(-1)
                rows = [(g, i) for g, (_, members) in enumerate(chunk) for i in members]
                first = {i: self._sum_logprobs(last[g : g + 1], conts[i][:1]) for g, i in rows}
                # options longest first, so each option batch pads to similar lengths
                multi = sorted(
                    ((g, i) for g, i in rows if len(conts[i]) > 1), key=lambda r: -len(conts[r[1]])
                )
                for i in (i for _, i in rows if len(conts[i]) == 1):
                    out[i] = (first[i], 1)
                for r0 in range(0, len(multi), batch_size):
                    part = multi[r0 : r0 + batch_size]
                    sel = torch.tensor([g for g, _ in part], device=last.device)
                    opt = [conts[i][:-1] for _, i in part]  # the last option token is only a target
                    o_ids, o_mask = right_pad(opt, self.tokenizer.pad_token_id)
                    width = o_ids.shape[1]
                    cache = DynamicCache([(k.index_select(0, sel), v.index_select(0, sel)) for k, v in kv])
                    positions = ctx_len.index_select(0, sel.cpu())[:, None] + torch.arange(width)[None, :]
                    full_mask = torch.cat([mask.index_select(0, sel.cpu()), o_mask], dim=1)
                    logits = self.model(
                        **self._forward_kwargs(
                            o_ids, full_mask, positions, past_key_values=cache, use_cache=True
                        )
                    ).logits
                    for row, (_, i) in enumerate(part):
                        n = len(conts[i])
                        out[i] = (first[i] + self._sum_logprobs(logits[row, : n - 1], conts[i][1:]), n)
            bar.update(len(rows))
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
        return tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

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

        from karma.tensors import left_pad

        tok = self.tokenizer
        texts = [self.format_prompt(p, chat_template) for p in prompts]
        eos = tok.eos_token_id
        out: list[Generation] = []
        for start in tqdm(
            range(0, len(texts), batch_size), desc="generating", disable=not progress, leave=False
        ):
            chunk = texts[start : start + batch_size]
            enc = [
                tok(t, add_special_tokens=False)["input_ids"][-(self.max_length - max_new_tokens) :]
                for t in chunk
            ]
            ids, mask = left_pad(enc, tok.pad_token_id)
            width = ids.shape[1]
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
                out.append(
                    Generation(tok.decode(row[:n], skip_special_tokens=True).strip(), n, eos not in row)
                )
        return out
