"""The trained policy: a causal LM (optionally with LoRA adapters) plus a scalar value head on its last
hidden state, the frozen reference policy, and the one forward pass that gives per-token log-probs,
values and entropies of responses.

Sequences are laid out as `[left-padded prompt | right-padded response]`; position ids are computed from the
attention mask so padding does not shift positions (the same positions vLLM uses for unpadded sequences).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from karma.tensors import left_pad, right_pad
from services.policy_trainer.config import ModelConfig
from services.policy_trainer.ppo_math import entropy_from_logits

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


class PolicyLoadError(ValueError):
    """A policy that cannot be used (e.g. a folder without a tokenizer)."""


def check_policy_path(path: str) -> None:
    """A local policy folder must hold config.json and a tokenizer (checked before any model loads)."""
    p = Path(path)
    if not p.is_dir():
        return  # a hub id: transformers resolves it
    if not (p / "config.json").exists():
        raise PolicyLoadError(f"policy folder {p} has no config.json")
    if not any((p / f).exists() for f in TOKENIZER_FILES):
        raise PolicyLoadError(
            f"policy folder {p} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save one with "
            "tokenizer.save_pretrained(folder)"
        )


def disable_dropout(model: nn.Module) -> None:
    """Dropout off in every mode (train mode is still needed for gradient checkpointing)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class ValueHead(nn.Module):
    """hidden (B, T, H) -> value (B, T)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.summary.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


@dataclass
class Packed:
    """B sequences laid out as `[left-padded prompt | right-padded response]`; P = longest prompt,
    T = longest response."""

    input_ids: torch.Tensor  # (B, P + T)
    attention_mask: torch.Tensor  # (B, P + T)
    response_mask: torch.Tensor  # (B, T) float, 1 on response tokens
    prompt_len: int  # P


def pack_sequences(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    *,
    prompt_width: int | None = None,
    response_width: int | None = None,
) -> Packed:
    """Token ids of prompts and their responses as one padded batch (the layout `forward_responses` reads);
    P and T default to the longest prompt / response (T at least 1), or are the widths given."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, width=prompt_width)
    T = response_width or max(max((len(r) for r in responses), default=0), 1)
    response_ids, response_mask = right_pad(responses, pad_id, width=T)
    return Packed(
        torch.cat([prompt_ids, response_ids], 1),
        torch.cat([prompt_mask, response_mask], 1),
        response_mask.float(),
        prompt_ids.shape[1],
    )


@dataclass
class Forward:
    logprobs: torch.Tensor  # (B, T) log p of the response tokens (at the sampling temperature)
    values: torch.Tensor | None  # (B, T) value before each response token, None without a value head
    entropy: torch.Tensor | None  # (B, T)


class Policy(nn.Module):
    """Causal LM (+ LoRA) + value head. `reference_*` gives the frozen initial policy's log-probs."""

    def __init__(self, lm: nn.Module, value_head: ValueHead | None, ref_lm: nn.Module | None, use_lora: bool):
        super().__init__()
        self.lm = lm
        self.value_head = value_head
        self.ref_lm = ref_lm  # None with LoRA: the base model with adapters disabled is the reference
        self.use_lora = use_lora

    @classmethod
    def load(cls, cfg: ModelConfig, path: str, *, with_value_head: bool) -> Policy:
        from transformers import AutoModelForCausalLM

        dtype = DTYPES[cfg.dtype]
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        lm.config.use_cache = True
        ref = None
        if cfg.use_lora:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=0.0,
                target_modules=list(cfg.lora_target_modules),
                task_type="CAUSAL_LM",
                bias="none",
            )
            lm = get_peft_model(lm, lora)
        else:
            ref = copy.deepcopy(lm).eval().requires_grad_(False)
        if cfg.gradient_checkpointing:
            lm.gradient_checkpointing_enable()
            if cfg.use_lora:
                lm.enable_input_require_grads()
        hidden = lm.config.get_text_config().hidden_size
        head = ValueHead(hidden).to(dtype) if with_value_head else None
        policy = cls(lm, head, ref, cfg.use_lora)
        disable_dropout(policy)  # the PPO ratio of an unchanged policy must be exactly 1
        policy.eval()
        return policy

    # ------------------------------------------------------------------------------------ forward
    def forward_responses(
        self,
        input_ids: torch.Tensor,  # (B, P + T)
        attention_mask: torch.Tensor,  # (B, P + T)
        prompt_len: int,  # P
        temperature: float,
        *,
        reference: bool = False,
        with_values: bool = True,
        with_entropy: bool = True,
    ) -> Forward:
        """Log-probs (and values, entropies) of the response tokens `input_ids[:, P:]` (on the policy's
        device; the inputs are moved there)."""
        device = self.lm.get_input_embeddings().weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        T = input_ids.shape[1] - prompt_len
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "logits_to_keep": T + 1,
            "use_cache": False,
        }
        if reference:
            if self.ref_lm is not None:
                out = self.ref_lm(**kwargs)
            else:
                with self.lm.disable_adapter():
                    out = self.lm(**kwargs)
            values = None
        else:
            want_values = with_values and self.value_head is not None
            out = self.lm(**kwargs, output_hidden_states=want_values)
            values = self.value_head(out.hidden_states[-1][:, prompt_len - 1 : -1]) if want_values else None
        logits = out.logits[:, :-1]  # (B, T, V): logits at position t predict token t+1
        logits = (logits if logits.dtype == torch.float64 else logits.float()) / temperature  # fp32 at least
        tokens = input_ids[:, prompt_len:]
        logprobs = torch.gather(torch.log_softmax(logits, -1), 2, tokens.unsqueeze(-1)).squeeze(-1)
        entropy = entropy_from_logits(logits) if (with_entropy and not reference) else None
        return Forward(logprobs, values, entropy)

    def forward(self, *args, **kwargs) -> Forward:
        """`forward_responses`: the call DistributedDataParallel wraps (its gradient hooks need `forward`)."""
        return self.forward_responses(*args, **kwargs)

    @contextmanager
    def reference_lm(self) -> Iterator[nn.Module]:
        """The frozen reference causal LM, e.g. to generate with (LoRA: the base model, adapters disabled)."""
        if self.ref_lm is not None:
            yield self.ref_lm
        else:
            with self.lm.disable_adapter():
                yield self.lm

    # ------------------------------------------------------------------------------------ parameters
    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.named_parameters():
            if p.requires_grad and not name.startswith("ref_lm."):
                yield name, p

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.trainable_named_parameters()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.trainable_named_parameters())
        missing, unexpected = set(params) - set(state), set(state) - set(params)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the policy: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    def lm_weights_for_inference(self, *, untied: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of the bare causal LM as `from_pretrained` names them; LoRA merged in on the fly, one
        layer at a time (a consumer that keeps none holds one merged layer at most). `untied`: a weight tied to
        one already yielded (the output head to the input embedding) is left out."""
        if not untied:
            yield from self._lm_weights()
            return
        # Only the model's own parameters can be tied. A merged LoRA weight is a fresh tensor: once the consumer
        # frees it, the next one may take its memory and its data_ptr, so fresh tensors must not be compared.
        params = {p.data_ptr() for p in self.lm.parameters()}
        seen: set[int] = set()
        for name, tensor in self._lm_weights():
            ptr = tensor.data_ptr()
            if ptr in params:
                if ptr in seen:
                    continue
                seen.add(ptr)
            yield name, tensor

    def _lm_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        if not self.use_lora:
            for n, p in self.lm.named_parameters(remove_duplicate=False):
                yield n, p.detach()
            return
        lora_layers: list[str] = []
        for name, module in self.lm.base_model.model.named_modules():
            if any(name.startswith(prefix + ".") for prefix in lora_layers):
                continue  # base_layer / lora_A / lora_B inside a LoRA layer: already merged
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                lora_layers.append(name)
                w = module.base_layer.weight.detach()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        w = w + module.get_delta_weight(adapter).detach().to(w.dtype)
                yield f"{name}.weight", w
                if getattr(module.base_layer, "bias", None) is not None:
                    yield f"{name}.bias", module.base_layer.bias.detach()
            elif not any(True for _ in module.children()):
                for pname, p in module.named_parameters(recurse=False):
                    yield f"{name}.{pname}" if name else pname, p.detach()

    def save_pretrained(self, path: Path, tokenizer) -> Path:
        """The policy as a standard HF causal-LM folder (LoRA merged), loadable by AutoModelForCausalLM."""
        path.mkdir(parents=True, exist_ok=True)
        if self.use_lora:  # merged layer by layer into the file: no merged copy of the model in memory
            model = self.lm.get_base_model()
            model.config.save_pretrained(path)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(path)
            write_safetensors(path / "model.safetensors", lambda: self.lm_weights_for_inference(untied=True))
        else:
            self.lm.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
}


def write_safetensors(path: Path, tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]]) -> None:
    """A safetensors file written one tensor at a time: `tensors()` is iterated twice (the header needs every
    shape and offset first, then the bytes follow in the same order), so only one tensor is held at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors():
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, t in tensors():
            data = t.detach().contiguous().cpu().view(torch.uint8).numpy()
            if data.nbytes != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise RuntimeError(f"{name} changed size between the two passes")
            f.write(data.tobytes())
    os.replace(tmp, path)
