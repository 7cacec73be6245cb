"""The training pieces that need torch: items, the collator, the losses and a `transformers.Trainer` subclass.

Imported only by `karma.rm.train.train_rm` (it pulls in torch and transformers). Every item is encoded by
`RewardModel.encode` and batched by `RewardModel.collate`, the same path the reward service scores with.

Batch layout (B items → N sequences, N = 2·pairs + singles):
    input_ids, attention_mask[, token_type_ids]  (N, T)   all sequences of the batch, right-padded
    pair_index                                   (P, 2)   rows (chosen, rejected) into the N sequences
    margin                                       (P,)     Bradley–Terry margin per pair (0 without margin)
    reg_index                                    (R,)     rows of sequences with a karma target
    reg_target                                   (R,)     their normalised karma
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Trainer

from karma.rm.model import Encoded, RewardModel, RMInput


# ------------------------------------------------------------------------------------------- losses
def pairwise_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Bradley–Terry: mean of -log σ(r_chosen - r_rejected - margin). Shapes (P,), (P,), (P,) -> ()."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "huber") -> torch.Tensor:
    """Huber (delta 1) or MSE between predicted reward and normalised karma. Shapes (R,), (R,) -> ()."""
    if kind == "huber":
        return F.huber_loss(pred, target, delta=1.0)
    if kind == "mse":
        return F.mse_loss(pred, target)
    raise ValueError(f"unknown regression loss {kind!r}; expected huber or mse")


# ------------------------------------------------------------------------------------------- data
@dataclass
class RMItem:
    """One training item: a pair (chosen, rejected) or a single reply with a karma target."""

    seqs: list[Encoded]  # 1 (single) or 2 (chosen, rejected)
    targets: list[float | None]  # karma per sequence, None where no regression target
    margin: float = 0.0


class LazyItems:
    """Map-style dataset: renders + tokenises item i on access (so `--full` starts training at once)."""

    def __init__(self, rm: RewardModel, inputs: Sequence[Sequence[RMInput]], targets, margins=None):
        self.rm, self.inputs, self.targets = rm, inputs, targets
        self.margins = margins

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> RMItem:
        seqs = [self.rm.encode(x) for x in self.inputs[i]]
        margin = float(self.margins[i]) if self.margins is not None else 0.0
        return RMItem(seqs=seqs, targets=list(self.targets[i]), margin=margin)


@dataclass
class RMCollator:
    """Flattens items into one padded batch plus the index tensors the losses read (see module doc)."""

    rm: RewardModel

    def __call__(self, items: Sequence[RMItem]) -> dict[str, torch.Tensor]:
        seqs: list[Encoded] = []
        pair_index, margin, reg_index, reg_target = [], [], [], []
        for it in items:
            base = len(seqs)
            seqs.extend(it.seqs)
            if len(it.seqs) == 2:
                pair_index.append((base, base + 1))
                margin.append(it.margin)
            for j, t in enumerate(it.targets):
                if t is not None:
                    reg_index.append(base + j)
                    reg_target.append(float(t))
        batch = self.rm.collate(seqs)
        batch["pair_index"] = torch.tensor(pair_index, dtype=torch.long).reshape(-1, 2)
        batch["margin"] = torch.tensor(margin, dtype=torch.float32)
        batch["reg_index"] = torch.tensor(reg_index, dtype=torch.long)
        batch["reg_target"] = torch.tensor(reg_target, dtype=torch.float32)
        return batch


# ------------------------------------------------------------------------------------------- trainer
class KarmaRMTrainer(Trainer):
    """`Trainer` with the KARMA losses and a validation pass that scores through `RewardModel`.

    `validate()` returns {metric: value} (higher is better); it replaces the default prediction loop so the
    early-stopping metric is exactly the one `karma rm eval` reports.
    """

    def __init__(
        self,
        *args,
        regression_kind: str = "huber",
        regression_weight: float = 1.0,
        validate: Callable[[], dict[str, float]] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.regression_kind = regression_kind
        self.regression_weight = regression_weight
        self.validate = validate
        self._parts: dict[str, list[float]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pair_index, margin = inputs.pop("pair_index"), inputs.pop("margin")
        reg_index, reg_target = inputs.pop("reg_index"), inputs.pop("reg_target")
        rewards = model(**inputs).logits[:, 0].float()  # (N,)
        loss = rewards.new_zeros(())
        if pair_index.numel():
            r_c, r_r = rewards[pair_index[:, 0]], rewards[pair_index[:, 1]]
            pw_loss = pairwise_loss(r_c, r_r, margin)
            loss = loss + pw_loss
            self._record("loss_pairwise", pw_loss)
            self._record("train_accuracy", (r_c > r_r).float().mean())
        if reg_index.numel():
            reg_loss = regression_loss(rewards[reg_index], reg_target, self.regression_kind)
            loss = loss + self.regression_weight * reg_loss
            self._record("loss_regression", reg_loss)
        return (loss, {"rewards": rewards}) if return_outputs else loss

    def _record(self, name: str, value: torch.Tensor) -> None:
        if self.model.training:
            self._parts.setdefault(name, []).append(float(value.detach()))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._parts:  # a training log: add the loss parts averaged since the last one
            logs.update({k: sum(v) / len(v) for k, v in self._parts.items()})
            self._parts = {}
        super().log(logs, *args, **kwargs)

    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        if self.validate is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        self.model.eval()
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.validate().items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
