"""Every option of every config group composes; typos fail at compose time, naming the choices."""

from pathlib import Path

import pytest
from conftest import compose_train
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from gspo_cli.algo.losses import LOSSES
from gspo_cli.cli import CONF_DIR
from gspo_cli.config import TrainConfig
from gspo_cli.data.rewards import REWARDS

GROUPS = ["model", "task", "algo", "hardware", "logger", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = compose_train([f"{group}={option}"] + (["model.path=/some/dir"] if option == "local" else []))
    assert isinstance(cfg, TrainConfig)
    assert cfg.algo.loss in LOSSES
    assert cfg.task.reward in REWARDS


def test_every_config_file_opens_with_a_comment():
    for path in Path(CONF_DIR).rglob("*.yaml"):
        assert path.read_text().startswith("#"), path


def test_defaults():
    cfg = compose_train()
    assert (cfg.model.name, cfg.task.name, cfg.algo.name, cfg.hardware.device) == ("tiny-qwen3-moe", "arithmetic", "gspo", "cpu")
    assert (cfg.algo.clip_low, cfg.algo.clip_high) == (3e-4, 4e-4)
    assert cfg.trainer.num_minibatches == 4
    assert cfg.logger.wandb


def test_grpo_uses_the_papers_baseline_clip_range():
    cfg = compose_train(["algo=grpo"])
    assert (cfg.algo.loss, cfg.algo.clip_low, cfg.algo.clip_high) == ("grpo", 0.2, 0.27)


def test_unknown_group_option_names_the_valid_choices():
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["algo=gpso"])
    message = str(err.value)
    assert "gspo" in message and "grpo" in message and "gspo-token" in message


def test_misspelled_key_fails():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        compose_train(["algo.clip_lwo=0.1"])
    assert "clip_lwo" in str(err.value) or "clip_lwo" in str(err.value.__cause__)


def test_wrong_type_fails():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_train(["trainer.max_steps=many"])


@pytest.mark.parametrize("algo", ["gspo", "grpo-replay"])
def test_the_moe_preset_fits_8_gpus_of_80_gb_by_the_documented_arithmetic(algo):
    """experiment=qwen3-moe-gsm8k's memory settings, evaluated with docs/scaling-out.md's formula
    (bench/fsdp_memory.py): every phase stays under 80 GB per GPU (an 80 GB H100 shows 85.5 GB to
    CUDA; the rest is for its context, NCCL and fragmentation). Without gradient checkpointing,
    the token budget or with the model gathered for sampling it would not."""
    from bench.fsdp_memory import GSM8K_PROMPT_TOKENS, QWEN3_30B_A3B, formula, peaks, run_of

    def worst(*overrides: str) -> float:
        cfg = compose_train(["experiment=qwen3-moe-gsm8k", f"algo={algo}", *overrides])
        return max(peaks(formula(QWEN3_30B_A3B, run_of(cfg, GSM8K_PROMPT_TOKENS))).values())

    cfg = compose_train(["experiment=qwen3-moe-gsm8k", f"algo={algo}"])
    assert cfg.algo.routing_replay == (algo == "grpo-replay")
    assert cfg.model.gradient_checkpointing and cfg.trainer.micro_batch_tokens > 0
    # the rollout's KV cache bounds the evaluation's
    assert 0 < cfg.trainer.eval_batch_size <= cfg.trainer.rollout_batch_size
    assert worst() < 80e9
    for missing in ("model.gradient_checkpointing=false", "trainer.micro_batch_tokens=0",
                    "hardware.gather_for_rollout=true"):
        assert worst(missing) > 85.5e9, missing
