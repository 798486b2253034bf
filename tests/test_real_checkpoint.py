"""A checkpoint laid out like Qwen3's (`tests/real_checkpoint.py`) through `model=local`: with its
chat template its responses end at `<|im_end|>`, the end token of its generation config, not
at max_new_tokens."""

import json

from conftest import compose_train
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

