"""Reward-model training on a tiny random BERT and a synthetic prepared-data folder (fast, CPU)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from karma.models import ModelNotFoundError
from karma.rm.data import DataError
from karma.rm.model import MissingRMConfigError, RewardModel, RMInput, new_reward_model
from karma.rm.template import TEMPLATE_DOC
from karma.rm.train import RMTrainConfig, train_rm
from tests.support import tiny_backbone, write_prepared_data

FAST = {"learning_rate": 3e-3, "batch_size": 16, "logging_steps": 5, "threads": 1, "progress": False}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return str(tiny_backbone(tmp_path_factory.mktemp("bb") / "tiny-bert"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_prepared_data(tmp_path_factory.mktemp("data") / "prepared")


@pytest.fixture(scope="module")
def pairwise_rm(backbone, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "context-pairwise"
    return train_rm(
        data,
        out,
        backbone=backbone,
        variant="context",
        objective="pairwise",
        max_steps=60,
        eval_steps=20,
        **FAST,
    )


def _log(path):
    return json.loads((path / "training_log.json").read_text())


def _first_last(path, key):
    values = [h[key] for h in _log(path) if key in h]
    return values[0], values[-1]


# ------------------------------------------------------------------------------------------- templates
def test_template_differs_per_variant(backbone):
    item = RMInput(
        context=["Is CS worth it?", "I am a junior deciding on a major."],
        response="Yes, if you like it.",
        metadata={
            "subreddit": "College",
            "depth": 1,
            "seconds_since_post": 300.0,
            "seconds_since_parent": 7200.0,
            "created_utc": 1_600_000_000,
            "sibling_count": 4,
        },
    )
    decoded = {}
    for v in ("full", "context", "response"):
        rm = new_reward_model(backbone, v, max_length=128)
        assert rm.config.template == TEMPLATE_DOC[v]
        enc = rm.encode(item)
        decoded[v] = rm.tokenizer.decode(enc.input_ids)
        assert (enc.token_type_ids is not None) and (max(enc.token_type_ids) == (0 if v == "response" else 1))
    assert decoded["response"] == "[CLS] yes, if you like it. [SEP]"
    assert (
        decoded["context"]
        == "[CLS] is cs worth it? i am a junior deciding on a major. [SEP] yes, if you like it. [SEP]"
    )
    assert decoded["full"] == (
        "[CLS] is cs worth it? i am a junior deciding on a major. [SEP] [ r / college | depth 1 | 5m after post | "
        "2. 0h after parent | 12h utc | 4 siblings ] yes, if you like it. [SEP]"
    )


def test_long_context_is_cut_from_the_left(backbone):
    rm = new_reward_model(backbone, "context", max_length=16)
    enc = rm.encode(RMInput("one two three four five six seven eight nine ten eleven twelve", "the reply"))
    assert enc.truncated and len(enc) == 16
    text = rm.tokenizer.decode(enc.input_ids)
    assert text.endswith("twelve [SEP] the reply [SEP]") and "one" not in text


# ------------------------------------------------------------------------------------------- training
def test_pairwise_loss_falls_and_validation_beats_chance(pairwise_rm):
    first, last = _first_last(pairwise_rm, "loss_pairwise")
    assert first == pytest.approx(0.693, abs=0.02)  # random head: σ(0) for every pair
    assert last < first - 0.15
    cfg = json.loads((pairwise_rm / "karma_rm.json").read_text())
    assert cfg["metrics"]["val"]["pairwise_accuracy"] > 0.6
    assert cfg["metrics"]["train"]["selection_metric"] == "pairwise_accuracy"
    assert cfg["metrics"]["train"]["steps"] == 60


def test_saved_folder_reloads_and_scores_identically(pairwise_rm, data):
    from karma.rm.data import example_inputs, read_examples

    cfg = json.loads((pairwise_rm / "karma_rm.json").read_text())
    rm = RewardModel.load(pairwise_rm)
    # score_normalization was computed in memory from the trained model on every val comment
    val = read_examples(data, "val")
    scores = rm.score(example_inputs(val))
    assert sum(scores) / len(scores) == pytest.approx(cfg["score_normalization"]["mean"], abs=1e-5)
    assert rm.normalize(scores) == pytest.approx(rm.score(example_inputs(val), normalize=True), abs=1e-6)
    again = RewardModel.load(pairwise_rm).score(example_inputs(val))
    assert again == scores  # same weights, same texts, same batches → identical floats


def test_folder_records_data_card_and_training_config(pairwise_rm, data):
    cfg = json.loads((pairwise_rm / "karma_rm.json").read_text())
    assert cfg["data_card_sha256"] == hashlib.sha256((data / "card.json").read_bytes()).hexdigest()
    assert cfg["variant"] == "context" and cfg["objective"] == "pairwise"
    assert cfg["karma_normalization"] == "log1p"
    assert cfg["truncation_side"] == "left" and cfg["max_length"] == 128
    assert cfg["training"]["learning_rate"] == 3e-3 and cfg["training"]["seed"] == 42
    assert cfg["score_normalization"]["std"] > 0
    assert (pairwise_rm / "config.json").exists() and (pairwise_rm / "tokenizer.json").exists()
    assert list((pairwise_rm / "tensorboard").glob("events.out.tfevents.*"))
    assert not (pairwise_rm / "checkpoints").exists()


def test_same_seed_same_model(backbone, data, tmp_path):
    a = train_rm(data, tmp_path / "a", backbone=backbone, max_steps=6, eval_steps=6, **FAST)
    b = train_rm(data, tmp_path / "b", backbone=backbone, max_steps=6, eval_steps=6, **FAST)
    ja, jb = (json.loads((p / "karma_rm.json").read_text()) for p in (a, b))
    assert ja["version"] == jb["version"]  # content hash of the weights + config


def test_regression_objective(backbone, data, tmp_path):
    out = train_rm(
        data, tmp_path / "reg", backbone=backbone, objective="regression", max_steps=40, eval_steps=20, **FAST
    )
    first, last = _first_last(out, "loss_regression")
    assert last < first * 0.7
    cfg = json.loads((out / "karma_rm.json").read_text())
    assert cfg["objective"] == "regression"
    assert cfg["metrics"]["train"]["item_kind"] == "examples"
    assert cfg["metrics"]["train"]["selection_metric"] == "spearman"
    n_train = int((pd.read_parquet(data / "examples.parquet")["split"] == "train").sum())
    assert cfg["metrics"]["train"]["items"] == n_train


def test_both_objective_with_margin_logs_both_losses(backbone, data, tmp_path):
    out = train_rm(
        data,
        tmp_path / "both",
        backbone=backbone,
        variant="full",
        objective="both",
        margin_scale=1.0,
        regression_weight=0.5,
        max_steps=10,
        eval_steps=10,
        **FAST,
    )
    logged = [h for h in _log(out) if "loss" in h]
    assert all("loss_pairwise" in h and "loss_regression" in h for h in logged)
    # the margin log(ratio) >= log 2 makes a fresh head's pairwise loss larger than log 2
    assert logged[0]["loss_pairwise"] > 0.75
    assert json.loads((out / "karma_rm.json").read_text())["template"] == TEMPLATE_DOC["full"]


def test_grad_accumulation_and_subreddit_filter(backbone, data, tmp_path):
    out = train_rm(
        data,
        tmp_path / "ga",
        backbone=backbone,
        grad_accum=2,
        batch_size=8,
        epochs=1.0,
        train_subreddits=["College"],
        **{k: v for k, v in FAST.items() if k != "batch_size"},
    )
    pairs = pd.read_parquet(data / "pairs.parquet")
    n = int(((pairs["split"] == "train") & (pairs["subreddit"] == "College")).sum())
    train = json.loads((out / "karma_rm.json").read_text())["metrics"]["train"]
    assert train["items"] == n
    assert train["steps"] == -(-n // 16)  # ceil(n / (batch 8 × accumulation 2))


def test_early_stopping_stops_when_validation_stalls(backbone, data, tmp_path):
    # lr 0: the validation metric never improves after the first evaluation; patience 1 stops at the second
    out = train_rm(
        data,
        tmp_path / "es",
        backbone=backbone,
        max_steps=50,
        eval_steps=3,
        patience=1,
        **{**FAST, "learning_rate": 0.0},
    )
    train = json.loads((out / "karma_rm.json").read_text())["metrics"]["train"]
    assert train["steps"] == 6 and train["stopped_early"] and train["best_step"] == 3


def test_subsampling_is_reported(backbone, data, tmp_path):
    out = train_rm(data, tmp_path / "sub", backbone=backbone, max_train=20, max_steps=2, eval_steps=2, **FAST)
    train = json.loads((out / "karma_rm.json").read_text())["metrics"]["train"]
    assert train["items"] == 20 and train["subsampled"] and train["items_available"] > 20


# ------------------------------------------------------------------------------------------- bad input
def test_missing_columns_fail_before_training(backbone, data, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(
        pq.read_table(data / "examples.parquet").drop_columns(["karma", "response"]), bad / "examples.parquet"
    )
    with pytest.raises(DataError, match=r"examples.parquet lacks required columns: response, karma"):
        train_rm(bad, tmp_path / "out", backbone=backbone, **FAST)
    assert not (tmp_path / "out").exists()


def test_missing_pairs_file_for_pairwise(backbone, data, tmp_path):
    bad = tmp_path / "nopairs"
    bad.mkdir()
    (bad / "examples.parquet").write_bytes((data / "examples.parquet").read_bytes())
    with pytest.raises(DataError, match="objective 'pairwise' needs pairs.parquet"):
        train_rm(bad, tmp_path / "out", backbone=backbone, **FAST)


def test_full_variant_on_data_without_metadata(backbone, tmp_path):
    d = write_prepared_data(tmp_path / "nometa", n_threads=12, metadata=False)
    with pytest.raises(
        DataError,
        match=r"variant 'full' needs metadata columns that .* lacks: depth, "
        r"seconds_since_post, seconds_since_parent, sibling_count",
    ):
        train_rm(d, tmp_path / "out", backbone=backbone, variant="full", **FAST)
    assert not (tmp_path / "out").exists()


def test_unknown_backbone_path(data, tmp_path):
    with pytest.raises(ModelNotFoundError, match="model path does not exist: ./no/such/backbone"):
        train_rm(data, tmp_path / "out", backbone="./no/such/backbone")
    not_hf = tmp_path / "empty"
    not_hf.mkdir()
    with pytest.raises(ModelNotFoundError, match="is not a Hugging Face model folder"):
        train_rm(data, tmp_path / "out", backbone=str(not_hf))
    assert not (tmp_path / "out").exists()


def test_data_folder_that_does_not_exist(backbone, tmp_path):
    with pytest.raises(DataError, match="data folder does not exist"):
        train_rm(tmp_path / "nope", tmp_path / "out", backbone=backbone)


def test_bad_config_values():
    with pytest.raises(ValueError, match="variant\n  Input should be 'full', 'context' or 'response'"):
        RMTrainConfig(variant="bogus")
    with pytest.raises(ValueError, match="objective\n  Input should be 'regression', 'pairwise' or 'both'"):
        RMTrainConfig(objective="ranking")
    with pytest.raises(ValueError, match="batch_size\n  Input should be greater than or equal to 1"):
        RMTrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="epochs must be > 0"):
        RMTrainConfig(epochs=0)
    assert RMTrainConfig(threads=0, eval_steps=0).threads is None  # the CLI's 0 = unset


def test_model_folder_without_karma_rm_json_is_refused(backbone):
    with pytest.raises(MissingRMConfigError, match="karma_rm.json is missing"):
        RewardModel.load(backbone)


def test_freeze_layers_trains_only_the_layers_above(backbone, data, tmp_path):
    from safetensors.torch import load_file

    from karma.rm.train import freeze_lower_layers

    out = train_rm(
        data, tmp_path / "frozen", backbone=backbone, max_steps=3, eval_steps=3, freeze_layers=1, **FAST
    )
    before = load_file(Path(backbone) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    for name, w in after.items():
        key = name.removeprefix("bert.")
        if key.startswith(("embeddings.", "encoder.layer.0.")):
            assert torch.equal(w, before[key]), name  # frozen: bit-identical to the backbone
        elif key.startswith("encoder.layer.1.") and key.endswith(".weight"):
            assert not torch.equal(w, before[key]), name  # the layer above trained
    rm = new_reward_model(backbone, "context")
    with pytest.raises(ValueError, match="freeze_layers = 3, but the backbone has 2 layers"):
        freeze_lower_layers(rm.model, 3)
