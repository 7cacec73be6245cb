"""Rollout engines: turn prompt token ids into sampled response token ids.

Both engines share one interface (`RolloutEngine`): `generate(prompts, seed=..., on_finished=...)` returns
one `Generation` per prompt and calls `on_finished(generations)` as soon as sequences finish, so the trainer
can ask for their rewards while the rest of the batch still generates. Old log-probs are *not* taken from
the engine: the trainer recomputes them with its own policy, so PPO's ratio is exact.

- `hf`: transformers `generate` on the trainer's own policy module (no weight sync needed). Early-finished
  sequences are reported from a stopping-criteria hook that never stops anything itself.
- `vllm`: vLLM in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), driven request by request through the
  engine's `step()` loop so every finished request is reported at once. After each update the trainer's
  full weights are loaded with the worker's `reload_weights` (LoRA is merged on the fly, so generation runs
  at base-model speed); the tied `lm_head` is re-packed and the prefix cache reset — see ../shared/VLLM.md.

`row_ids` (the data-parallel layout, see `distributed`): each prompt's global index in the step's batch.
With them every row is sampled from its own seed (seed, row id) alone, whichever other prompts share the
call — the union of the ranks' shares is then the batch one process samples. vLLM seeds each request that
way anyway (the row id replaces the position in the call); `hf` then samples by Gumbel-max with one
generator per row (`RowSeededSampling`, an exact sample of softmax(logits / T)) instead of `generate`'s one
stream for the whole batch. `prompt_width` left-pads the prompts to the step's widest prompt.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass
class Generation:
    index: int  # position of the prompt in the generate() call
    response_ids: list[int]  # sampled tokens, up to and including the EOS token when there is one
    ended_with_eos: bool  # False: cut by max_new_tokens
    #: sum of the log-probabilities of `response_ids` under the engine's policy (temperature 1 only), when the
    #: engine was asked for it and can give it (vLLM: free with the sample); None otherwise
    logprob: float | None = None


OnFinished = Callable[[list[Generation]], None]


class RolloutEngine(Protocol):
    name: str

    def generate(
        self,
        prompts: list[list[int]],
        *,
        seed: int,
        max_new_tokens: int,
        temperature: float,
        on_finished: OnFinished | None = None,
        row_ids: list[int] | None = None,
        prompt_width: int | None = None,
        logprobs: bool = False,
    ) -> list[Generation]: ...

    def sync_weights(self, policy) -> None: ...

    def close(self) -> None: ...


def row_seed(seed: int, row: int) -> int:
    """The sampling seed of row `row` of a step whose seed is `seed` (both engines)."""
    return (seed * 7919 + row) % 2**31


class RowSeededSampling:
    """A transformers logits processor for greedy `generate`: adds Gumbel noise drawn from one generator per
    row (seeded with `row_seed(seed, row)`) to logits / T, so argmax is a sample of softmax(logits / T) that
    depends on the row's own seed and logits only, not on the other rows of the call."""

    def __init__(self, seed: int, row_ids: list[int], temperature: float):
        import torch

        self.temperature = temperature
        self.generators = [torch.Generator().manual_seed(row_seed(seed, r)) for r in row_ids]

    def __call__(self, input_ids, scores):  # scores (B, V) -> (B, V)
        import torch

        u = torch.stack([torch.rand(scores.shape[1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(u))  # u = 0 gives -inf: never chosen
        return scores.float() / self.temperature + gumbel.to(scores.device)


def _cut(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1], True
    return tokens, False


class HFEngine:
    """transformers `generate` on the trainer's policy (same weights, nothing to sync)."""

    name = "hf"

    def __init__(self, policy, tokenizer, eos_ids: set[int]):
        self.policy = policy
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
        self.eos_ids = eos_ids

    def generate(
        self,
        prompts: list[list[int]],
        *,
        seed: int,
        max_new_tokens: int,
        temperature: float,
        on_finished: OnFinished | None = None,
        row_ids: list[int] | None = None,
        prompt_width: int | None = None,
        logprobs: bool = False,  # not given: transformers `generate` does not keep them cheaply
    ) -> list[Generation]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        from karma.tensors import left_pad

        lm = self.policy.lm
        device = next(lm.parameters()).device
        ids, mask = left_pad(prompts, self.pad_id, width=prompt_width)
        ids, mask = ids.to(device), mask.to(device)
        P = ids.shape[1]
        reported: set[int] = set()
        eos = torch.tensor(sorted(self.eos_ids), device=device)
        engine = self

        class ReportFinished(StoppingCriteria):
            """Reports rows whose newest token is an EOS; never stops generation itself."""

            def __call__(self, input_ids, scores, **kwargs):
                done = torch.isin(input_ids[:, -1], eos).nonzero().flatten().tolist()
                fresh = [i for i in done if i not in reported]
                if fresh and on_finished is not None:
                    reported.update(fresh)
                    on_finished([engine._generation(i, input_ids[i, P:].tolist()) for i in fresh])
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        sample = temperature > 0
        processors = LogitsProcessorList()
        if sample and row_ids is not None:  # greedy over Gumbel-perturbed logits: a per-row seeded sample
            processors.append(RowSeededSampling(seed, row_ids, temperature))
            knobs: dict = {"do_sample": False}
        else:  # explicit top_k 0 / top_p 1.0: left unset, transformers fills in top_k=50 and the samples are
            # no longer drawn from the policy whose log-probs PPO uses
            knobs = {
                "do_sample": sample,
                "temperature": temperature if sample else None,
                "top_k": 0,
                "top_p": 1.0,
            }
        gen_cfg = GenerationConfig(
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
            **knobs,
        )
        was_training = lm.training
        lm.eval()
        torch.manual_seed(seed)
        with torch.no_grad():
            out = lm.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=gen_cfg,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([ReportFinished()]),
            )
        lm.train(was_training)
        gens = [self._generation(i, out[i, P:].tolist()) for i in range(len(prompts))]
        late = [g for g in gens if g.index not in reported]
        if late and on_finished is not None:
            on_finished(late)
        return gens

    def _generation(self, index: int, tokens: list[int]) -> Generation:
        tokens, eos = _cut(tokens, self.eos_ids)
        return Generation(index, tokens, eos)

    def sync_weights(self, policy) -> None:  # generates with the trainer's own module
        return None

    def close(self) -> None:
        return None


class VLLMEngine:
    """vLLM in this process; full weights synced from the trainer after every update."""

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str,
        max_model_len: int,
        seed: int,
        eos_ids: set[int],
        kv_cache_gib: float = 1.0,
        gpu_memory_utilization: float = 0.3,
        enforce_eager: bool = False,
        max_num_seqs: int | None = None,
    ):
        # in-process engine: weights can be handed over as tensors (must be set before vllm is imported)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import torch

        kwargs: dict = {} if max_num_seqs is None else {"max_num_seqs": max_num_seqs}
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)  # default would be 92 % of RAM
            # vLLM 0.32 on CPU writes an AOT compile artifact it cannot load back ("'function' object has no
            # attribute 'finalize_loading'"), so every start recompiled: 57-78 s here; with the older
            # torch.compile cache a warm start takes 25 s.
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
            # In process, vLLM drops torch to 1 thread "for serving" unless OMP_NUM_THREADS is set, and then
            # makes torch.set_num_threads a no-op: the trainer's forward/backward would run on one core. The
            # trainer set its count (karma.threads) before this; telling vLLM keeps it.
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
            # Chunked prefill splits a batch's prompts across engine steps and discards the tokens sampled for
            # a part-prefilled prompt by rewinding its seeded generator, which a CPU generator cannot do
            # ("CPU Generator does not use offset": a batch of 32 prompts of 190 tokens failed here). Whole
            # prompts only: a step takes as many as fit in max_num_batched_tokens (>= one full sequence).
            kwargs["enable_chunked_prefill"] = False
            batch_tokens = 4096 if max_num_seqs is None else min(4096, max_num_seqs * max_model_len)
            kwargs["max_num_batched_tokens"] = max(max_model_len, batch_tokens)
        from vllm import LLM

        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            enable_prefix_caching=True,
            enforce_eager=enforce_eager,
            **kwargs,
        )
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self._ids = itertools.count()

    def generate(
        self,
        prompts: list[list[int]],
        *,
        seed: int,
        max_new_tokens: int,
        temperature: float,
        on_finished: OnFinished | None = None,
        row_ids: list[int] | None = None,
        prompt_width: int | None = None,  # vLLM does not pad
        logprobs: bool = False,
    ) -> list[Generation]:
        """`logprobs`: also each reply's summed log-probability (vLLM's raw log-probs of the sampled tokens,
        which are the policy's at temperature 1: asked for only then)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        call = next(self._ids)
        rows = row_ids if row_ids is not None else list(range(len(prompts)))
        for i, p in enumerate(prompts):
            params = SamplingParams(
                n=1,
                temperature=temperature,
                top_p=1.0,
                top_k=0,
                max_tokens=max_new_tokens,
                stop_token_ids=sorted(self.eos_ids),
                seed=row_seed(seed, rows[i]) if temperature > 0 else None,
                detokenize=False,
                logprobs=0 if logprobs and temperature == 1.0 else None,
            )
            engine.add_request(f"{call}-{i}", TokensPrompt(prompt_token_ids=list(p)), params)
        gens: dict[int, Generation] = {}
        while engine.has_unfinished_requests():
            finished = []
            for out in engine.step():
                if out.finished:
                    index = int(out.request_id.rsplit("-", 1)[1])
                    sample = out.outputs[0]
                    tokens, eos = _cut(list(sample.token_ids), self.eos_ids)
                    lp = None
                    if sample.logprobs:  # one {token: Logprob} per sampled token
                        lp = sum(step[t].logprob for t, step in zip(tokens, sample.logprobs, strict=False))
                    gens[index] = Generation(index, tokens, eos, lp)
                    finished.append(gens[index])
            if finished and on_finished is not None:
                on_finished(finished)
        missing = set(range(len(prompts))) - set(gens)
        if missing:
            raise RuntimeError(f"vLLM returned no output for prompt(s) {sorted(missing)[:5]}")
        return [gens[i] for i in range(len(prompts))]

    def sync_weights(self, policy) -> None:
        """Load the trainer's current weights into the engine (see the module docstring)."""
        worker = self.llm.llm_engine.model_executor.driver_worker.worker
        worker.reload_weights(weights_iterator=policy.lm_weights_for_inference(untied=True))
        head = getattr(worker.model_runner.model, "lm_head", None)
        quant = getattr(head, "quant_method", None)
        if quant is not None and hasattr(quant, "process_weights_after_loading"):
            quant.process_weights_after_loading(head)  # a tied lm_head is not refreshed otherwise
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        import gc

        del self.llm
        gc.collect()
