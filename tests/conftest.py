"""Shared fixtures: a tiny built model and a tiny checkpoint laid out like Qwen3's in a per-session
cache, W&B offline in temp folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from gspo_cli.cli import CONF_DIR
from gspo_cli.config import ModelConfig, TinyModelSpec, TrainConfig, register_configs
from gspo_cli.models.build import built_model_dir
from gspo_cli.models.loading import load_model, load_tokenizer

# A model small enough that a test step takes milliseconds.
TEST_SPEC = TinyModelSpec(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=32)


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gspo-cache")


@pytest.fixture(scope="session")
def tiny_model_dir(cache_dir) -> Path:
    return built_model_dir(ModelConfig(name="test-moe", build=TEST_SPEC), cache_dir)


@pytest.fixture(scope="session")
def real_checkpoint_dir(cache_dir) -> Path:
    """A tiny Qwen3-MoE checkpoint laid out like Qwen3's (`tests/real_checkpoint.py`), fine-tuned
    to answer one-digit sums in its chat template and end its turn with `<|im_end|>`."""
    from real_checkpoint import fine_tuned_checkpoint

    return fine_tuned_checkpoint(cache_dir)


@pytest.fixture(scope="session")
def real_base_dir(cache_dir) -> Path:
    """The same checkpoint before fine-tuning (random weights)."""
    from real_checkpoint import base_checkpoint

    return base_checkpoint(cache_dir)


@pytest.fixture
def tiny_model(tiny_model_dir):
    torch.manual_seed(0)
    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


def compose_train(overrides: list[str] | None = None) -> TrainConfig:
    """Compose the real `conf/train.yaml` with overrides, as `gspo train` does."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides or [])
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg)
