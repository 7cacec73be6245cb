"""Train a KARMA reward model on a prepared data folder: `train_rm(data, out, ...) -> Path`.

Phases: check (config, backbone path, data schema — before any model is loaded) → read + subsample →
build the model → `Trainer.train` (early stopping on the validation metric, best checkpoint restored) →
validation metrics + score normalisation → save the RM folder (`RewardModel.save` + karma_rm.json).

Objectives (see `karma.rm.trainer` for the losses):
* `regression` — Huber (or MSE) on normalised karma, one item per row of examples.parquet.
* `pairwise`   — Bradley–Terry on pairs.parquet, optional margin `margin_scale · log(score_ratio)`.
* `both`       — one item per pair: Bradley–Terry + `regression_weight` × regression of both replies'
  karma (`chosen_karma`, `rejected_karma` of the pair).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from karma.config import Cli
from karma.rm import data as rmdata
from karma.rm.template import VARIANTS

log = logging.getLogger(__name__)

#: the default run on a 2-core CPU: 1,000 training items, 128 tokens, one epoch (a few minutes with MiniLM)
DEFAULT_MAX_TRAIN = 1000
#: validation items scored at each evaluation during training (pairs, or comments for `regression`)
DEFAULT_MAX_EVAL = 200
#: validation comments scored once after training for the score normalisation (mean / std)
NORM_EXAMPLES = 1000


class RMHyperParams(BaseModel):
    """Everything of a reward-model training run but the input variant (what `karma rm compare` shares
    between its variants, and `karma experiment`'s `rm:` holds)."""

    model_config = ConfigDict(extra="forbid")

    objective: Literal[rmdata.OBJECTIVES] = Field(
        "pairwise", description="regression on karma, Bradley-Terry on pairs, or both"
    )
    backbone: str = Field("minilm", description="'minilm' (embedded default), a local HF folder, or a hub id")
    max_length: int = Field(
        128, ge=1, description="tokens per (context, response); the context is cut from the left"
    )
    epochs: float = Field(1.0, description="passes over the (subsampled) training items")
    max_steps: int = Field(-1, description="stop after N optimizer steps (-1: epochs decide)")
    batch_size: int = Field(16, ge=1, description="items (pairs or replies) per forward pass")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    learning_rate: Annotated[float, Cli("--learning-rate", "--lr")] = Field(
        5e-5, ge=0, description="AdamW peak learning rate (linear schedule)"
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    freeze_layers: int = Field(
        0,
        ge=0,
        description="freeze the embeddings and the first N encoder layers (0: train everything); backward "
        "then stops above them: N = 4 of MiniLM's 6 trains in ~0.6 of the time",
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="linear warm-up as a fraction of the steps")
    regression_loss: Literal["huber", "mse"] = Field("huber", description="regression loss")
    regression_weight: float = Field(0.5, ge=0, description="`both`: weight of the regression term")
    margin_scale: float = Field(0.0, ge=0, description="pairwise margin = scale * log(score_ratio); 0 = off")
    max_train: int | None = Field(
        DEFAULT_MAX_TRAIN, ge=1, description="subsample N training items (unset or --full: all)"
    )
    max_eval: int | None = Field(DEFAULT_MAX_EVAL, ge=1, description="validation items per evaluation")
    norm_examples: int = Field(
        NORM_EXAMPLES,
        ge=2,
        description="validation comments scored once after training for the score normalisation (mean / std) "
        "and the final validation metrics",
    )
    eval_steps: int | None = Field(
        None, ge=1, description="steps between validations (unset or 0: four per run)"
    )
    patience: int = Field(3, ge=1, description="early stopping: evaluations without improvement")
    logging_steps: int = Field(10, ge=1, description="steps between training-loss logs")
    seed: int = Field(42, description="seeds sampling, head init, shuffling and dropout")
    train_subreddits: Annotated[list[str] | None, Cli("--train-subreddit")] = Field(
        None, description="train (and validate) on these subreddits only (transfer study); repeatable"
    )
    device: str = Field("cpu", description="torch device")
    threads: int | None = Field(
        None,
        ge=1,
        description="torch.set_num_threads for this process (unset or 0: torch's default); 1 is fastest for "
        "tiny models on a busy CPU",
    )
    progress: bool = Field(True, description="show the Trainer's progress bar")

    @field_validator("eval_steps", "threads", mode="before")
    @classmethod
    def _zero_is_unset(cls, value: Any) -> Any:
        return None if value in (0, "0") else value

    @model_validator(mode="after")
    def _length(self) -> RMHyperParams:
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("epochs must be > 0 (or set max_steps)")
        return self


class RMTrainConfig(RMHyperParams):
    """Hyper-parameters of one reward-model training run (saved into karma_rm.json under `training`)."""

    variant: Literal[VARIANTS] = Field(
        "context", description="input template: full (context + metadata), context, response"
    )

    @property
    def pairs(self) -> bool:
        return self.objective in ("pairwise", "both")

    @property
    def selection_metric(self) -> str:
        """Validation metric for early stopping / best checkpoint (higher is better)."""
        return "pairwise_accuracy" if self.pairs else "spearman"


def _validation_fn(rm, val_examples, val_pairs, val_meta, metric: str):
    from karma.rm.metrics import correlations, pairwise_accuracy

    if metric == "pairwise_accuracy":
        chosen, rejected = rmdata.pair_inputs(val_pairs, val_meta)

        def validate() -> dict[str, float]:
            return {"pairwise_accuracy": pairwise_accuracy(rm.score(chosen), rm.score(rejected)) or 0.0}
    else:
        inputs, karma = rmdata.example_inputs(val_examples), val_examples["karma"].to_numpy()

        def validate() -> dict[str, float]:
            return {"spearman": correlations(rm.score(inputs), karma)["spearman"] or 0.0}

    return validate


def _training_items(rm, cfg: RMTrainConfig, train_examples, train_pairs, meta):
    from karma.rm.trainer import LazyItems

    if not cfg.pairs:
        inputs = [[x] for x in rmdata.example_inputs(train_examples)]
        return LazyItems(rm, inputs, [[k] for k in train_examples["karma"].tolist()])
    chosen, rejected = rmdata.pair_inputs(train_pairs, meta)
    if cfg.objective == "both":
        targets = list(
            zip(train_pairs["chosen_karma"].tolist(), train_pairs["rejected_karma"].tolist(), strict=True)
        )
    else:
        targets = [(None, None)] * len(chosen)
    margins = None
    if cfg.margin_scale:
        margins = [
            cfg.margin_scale * math.log(min(max(r, 1.0), 1e4)) for r in train_pairs["score_ratio"].tolist()
        ]
    return LazyItems(rm, list(zip(chosen, rejected, strict=True)), targets, margins)


def _load_backbone(backbone: str, cfg: RMTrainConfig, **config: Any):
    from karma.models import ModelNotFoundError
    from karma.rm.model import new_reward_model

    try:
        return new_reward_model(backbone, cfg.variant, max_length=cfg.max_length, device=cfg.device, **config)
    except OSError as e:  # hub id without network / cache, or a folder transformers cannot read
        raise ModelNotFoundError(f"cannot load backbone {cfg.backbone!r}: {e}") from e


def freeze_lower_layers(model, n: int) -> None:
    """Freeze a BERT-like encoder's embeddings and its first `n` layers (`base_model.embeddings`,
    `base_model.encoder.layer`); the layers above, the pooler and the head train."""
    base = model.base_model
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None or not hasattr(base, "embeddings"):
        raise ValueError(f"freeze_layers: {type(model).__name__} has no embeddings + encoder.layer to freeze")
    if n > len(layers):
        raise ValueError(f"freeze_layers = {n}, but the backbone has {len(layers)} layers")
    for module in [base.embeddings, *layers[:n]]:
        for p in module.parameters():
            p.requires_grad_(False)


def train_rm(
    data: str | Path, out: str | Path, config: RMTrainConfig | None = None, **overrides: Any
) -> Path:
    """Train one reward model on `data` (a `karma data prepare` folder) and save it to `out`. Returns `out`.

    `overrides` are RMTrainConfig fields (e.g. `train_rm(d, o, variant="full", max_train=None)`).
    Raises `DataError` / `ModelNotFoundError` / `ValueError` before any training on bad input.
    """
    from karma.models import resolve_backbone

    cfg = RMTrainConfig(**{**(config.model_dump() if config is not None else {}), **overrides})
    data, out = Path(data), Path(out)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # ---- check: everything that can fail fast, before loading a model
    backbone = resolve_backbone(cfg.backbone)
    rmdata.check_data(data, cfg.variant, cfg.objective)

    # ---- read + subsample
    subs = cfg.train_subreddits
    if cfg.pairs:
        all_pairs = rmdata.read_pairs(data, "train", subreddits=subs)
        n_available = len(all_pairs)
        train_pairs = rmdata.read_pairs(data, "train", subreddits=subs, max_rows=cfg.max_train, seed=cfg.seed)
        val_pairs = rmdata.read_pairs(data, "val", subreddits=subs, max_rows=cfg.max_eval, seed=cfg.seed)
        train_examples = None
        ids = list(train_pairs["chosen_id"]) + list(train_pairs["rejected_id"])
        ids += list(val_pairs["chosen_id"]) + list(val_pairs["rejected_id"])
        meta = rmdata.metadata_by_id(data, ids) if cfg.variant == "full" else {}
        n_train, what = len(train_pairs), "pairs"
        if len(val_pairs) == 0:
            raise rmdata.DataError(
                f"{data} has no validation pairs" + (f" in r/{', r/'.join(subs)}" if subs else "")
            )
    else:
        all_ex = rmdata.read_examples(data, "train", subreddits=subs, metadata=False)
        n_available = len(all_ex)
        del all_ex
        train_examples = rmdata.read_examples(
            data, "train", subreddits=subs, max_rows=cfg.max_train, seed=cfg.seed
        )
        train_pairs, val_pairs, meta = None, None, {}
        n_train, what = len(train_examples), "examples"
    if n_train == 0:
        raise rmdata.DataError(
            f"{data} has no training {what}" + (f" in r/{', r/'.join(subs)}" if subs else "")
        )
    val_examples = rmdata.read_examples(
        data,
        "val",
        subreddits=subs,
        max_rows=max(cfg.max_eval, cfg.norm_examples) if cfg.max_eval else None,
        seed=cfg.seed,
        by_thread=True,
    )
    if len(val_examples) < 2:
        raise rmdata.DataError(f"{data} has fewer than 2 validation examples; cannot normalise scores")
    subsampled = n_train < n_available
    log.info(
        "training on %d of %d train %s%s",
        n_train,
        n_available,
        what,
        " (subsampled; pass --full / max_train=None for all)" if subsampled else "",
    )
    timings["read_s"] = time.perf_counter() - t0

    # ---- model
    from transformers import EarlyStoppingCallback, TrainingArguments, set_seed
    from transformers.integrations import TensorBoardCallback

    from karma.rm.trainer import KarmaRMTrainer, LazyItems, RMCollator

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    t = time.perf_counter()
    rm = _load_backbone(
        backbone,
        cfg,
        objective=cfg.objective,
        karma_normalization=rmdata.karma_normalization(data),
        data_card_sha256=rmdata.card_sha256(data),
    )
    timings["load_s"] = time.perf_counter() - t
    if cfg.freeze_layers:
        freeze_lower_layers(rm.model, cfg.freeze_layers)

    train_items = _training_items(rm, cfg, train_examples, train_pairs, meta)
    val_items = LazyItems(rm, [], [])
    steps_per_epoch = math.ceil(len(train_items) / (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(steps_per_epoch * cfg.epochs))
    eval_steps = cfg.eval_steps or max(1, math.ceil(total_steps / 4))
    validate = _validation_fn(
        rm,
        val_examples.head(cfg.max_eval) if cfg.max_eval else val_examples,
        val_pairs,
        meta,
        cfg.selection_metric,
    )

    ckpt_dir = out / "checkpoints"
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=round(cfg.warmup_ratio * total_steps),
        lr_scheduler_type="linear",
        logging_steps=min(cfg.logging_steps, total_steps),
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_only_model=True,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model=cfg.selection_metric,
        greater_is_better=True,
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=cfg.device == "cpu",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not cfg.progress,
    )
    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(log_dir=str(out / "tensorboard"))
    trainer = KarmaRMTrainer(
        model=rm.model,
        args=args,
        train_dataset=train_items,
        eval_dataset=val_items,
        data_collator=RMCollator(rm),
        callbacks=[
            EarlyStoppingCallback(early_stopping_patience=cfg.patience),
            TensorBoardCallback(tb_writer=tb),
        ],
        regression_kind=cfg.regression_loss,
        regression_weight=1.0 if cfg.objective == "regression" else cfg.regression_weight,
        validate=validate,
    )
    t = time.perf_counter()
    result = trainer.train()
    timings["train_s"] = time.perf_counter() - t
    rm.model = trainer.model.eval()
    tb.close()

    # ---- validation metrics + score normalisation (best checkpoint is loaded)
    from karma.rm.metrics import correlations, pairwise_accuracy

    t = time.perf_counter()
    if cfg.max_eval:  # else every val comment (--full-eval)
        val_examples = val_examples.head(max(cfg.norm_examples, cfg.max_eval))
    val_scores = rm.score(rmdata.example_inputs(val_examples))
    import numpy as np

    vs = np.asarray(val_scores, dtype=float)
    rm.config.score_normalization.mean = float(vs.mean())
    rm.config.score_normalization.std = float(vs.std()) if vs.std() > 1e-8 else 1.0
    val_metrics: dict[str, Any] = dict(correlations(val_scores, val_examples["karma"].to_numpy()))
    if val_pairs is not None:
        chosen, rejected = rmdata.pair_inputs(val_pairs, meta)
        val_metrics["pairwise_accuracy"] = pairwise_accuracy(rm.score(chosen), rm.score(rejected))
        val_metrics["n_pairs"] = len(val_pairs)
    timings["validate_s"] = time.perf_counter() - t

    state = trainer.state
    items_seen = min(state.global_step * cfg.batch_size * cfg.grad_accum, len(train_items) * cfg.epochs)
    train_info = {
        "items": n_train,
        "items_available": n_available,
        "item_kind": what,
        "subsampled": subsampled,
        "steps": state.global_step,
        "best_step": state.best_global_step,
        "best_metric": state.best_metric,
        "selection_metric": cfg.selection_metric,
        "train_loss": result.training_loss,
        "stopped_early": state.global_step < total_steps,
        "items_per_s": items_seen / timings["train_s"] if timings["train_s"] > 0 else None,
    }
    rm.config.metrics = {
        "val": val_metrics,
        "train": train_info,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    rm.config.training = cfg.model_dump()  # type: ignore[attr-defined]  # KarmaRMConfig allows extra keys
    rm.config.backbone = cfg.backbone  # the alias / id as given, not this machine's resolved path
    t = time.perf_counter()
    rm.save(out)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    (out / "training_log.json").write_text(json.dumps(state.log_history, indent=1))
    log.info(
        "saved %s (val %s) in %.0fs",
        out,
        {k: v for k, v in val_metrics.items() if k != "n"},
        time.perf_counter() - t0,
    )
    return out
