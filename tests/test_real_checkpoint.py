"""A checkpoint laid out like Qwen3's (`tests/real_checkpoint.py`) through `model=local`: with its
chat template its responses end at `<|im_end|>`, the end token of its generation config, not
at max_new_tokens; and the GSM8K presets run on it."""

import json

import pytest
from conftest import compose_train
from test_tasks import GSM8K_ROWS, offline_datasets, write_hub_layout  # noqa: F401 - a fixture
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from gspo_cli.train.loop import train

MAX_NEW_TOKENS = 24


def chat_overrides(model_dir, steps=2):
    return ["model=local", f"model.path={model_dir}", "task.chat_template=true", "task.max_operand=9",
            "task.num_eval=20", f"trainer.max_steps={steps}", "trainer.prompts_per_step=8", "trainer.group_size=4",
            f"trainer.max_new_tokens={MAX_NEW_TOKENS}", "trainer.eval_every=1", "trainer.lr=1e-3", "logger=none"]


def test_chat_responses_stop_at_im_end_and_earn_reward(tmp_path, real_checkpoint_dir):
    # Laid out like Qwen3 Base: eos = pad = <|endoftext|>; the generation config ends turns at <|im_end|> too.
    tokenizer = AutoTokenizer.from_pretrained(real_checkpoint_dir)
    im_end, end_of_text = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert GenerationConfig.from_pretrained(real_checkpoint_dir).eos_token_id == [im_end, end_of_text]
    assert AutoConfig.from_pretrained(real_checkpoint_dir).model_type == "qwen3_moe"

    cfg = compose_train(chat_overrides(real_checkpoint_dir))
    train(cfg, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for line in lines[:2]:  # the two RL steps
        # An answer of one or two digits and <|im_end|>: far below max_new_tokens.
        assert line["response_length/mean"] < MAX_NEW_TOKENS / 4, line
        assert line["response/truncated_fraction"] < 0.5, line
        assert line["reward/mean"] > 0, line
        assert line["eval/response_length"] < MAX_NEW_TOKENS / 4 and line["eval/accuracy"] > 0, line
    # The trained model keeps the checkpoint's generation config, so `gspo eval` stops the same way.
    final = GenerationConfig.from_pretrained(tmp_path / "run" / "checkpoints" / "final")
    assert final.eos_token_id == [im_end, end_of_text]


PRESETS = {  # the numbers each preset cites in its comments
    "qwen3-0.6b-gsm8k": dict(model="qwen3-0.6b", hardware="cuda", lr=1e-6, G=8, prompts=32, max_new_tokens=1024),
    "qwen3-moe-gsm8k": dict(model="qwen3-moe", hardware="cuda", lr=1e-6, G=16, prompts=64, max_new_tokens=1024),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_gsm8k_presets_compose_and_run_two_steps_on_the_test_checkpoint(preset, tmp_path, real_checkpoint_dir,
                                                                         offline_datasets):
    expected, cfg = PRESETS[preset], compose_train([f"experiment={preset}"])
    assert (cfg.model.name, cfg.hardware.device, cfg.task.name, cfg.task.path, cfg.task.config_name) == (
        expected["model"], expected["hardware"], "gsm8k", "openai/gsm8k", "main")
    assert cfg.task.chat_template and cfg.task.reward == "math" and (cfg.task.split, cfg.task.eval_split) == ("train", "test")
    tc = cfg.trainer
    assert (tc.lr, tc.group_size, tc.prompts_per_step, tc.max_new_tokens) == (
        expected["lr"], expected["G"], expected["prompts"], expected["max_new_tokens"])
    assert (tc.num_minibatches, tc.temperature, tc.stop_strings) == (4, 1.0, ["<|im_end|>"])

    # Offline, on a GSM8K repository laid out like the hub's, with the model and sizes made small.
    repo = write_hub_layout(tmp_path / "gsm8k", {"train": GSM8K_ROWS[:4], "test": GSM8K_ROWS[4:]})
    small = compose_train([f"experiment={preset}", "model=local", f"model.path={real_checkpoint_dir}",
                           "hardware=cpu", f"task.path={repo}", "trainer.max_steps=2", "trainer.prompts_per_step=2",
                           "trainer.group_size=2", "trainer.max_new_tokens=8", "trainer.eval_every=1",
                           "logger=none"])
    record = train(small, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2]
    assert "eval/accuracy" in record and all(0 <= line["response/truncated_fraction"] <= 1 for line in lines[:2])
