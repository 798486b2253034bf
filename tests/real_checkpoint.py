"""A test checkpoint laid out like a real one: Qwen3's tokenizer layout and special tokens, a
chat template, a generation config with two end tokens, and a tiny Qwen3-MoE, all written by
the real libraries' `save_pretrained` and read back by `from_pretrained`.

What it copies from Qwen3 Base checkpoints (Qwen/Qwen3-0.6B-Base, Qwen3-30B-A3B-Base):
- a byte-level BPE (`Qwen2Tokenizer`: Qwen's pre-tokenizer regex, digits one by one), trained
  here with `tokenizers` on the task's text in chat format;
- the special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` after the learned vocabulary,
  with `<|endoftext|>` both eos and pad; `<think>`/`</think>` as ordinary added tokens;
- Qwen3's chat template for plain messages (a system turn, `add_generation_prompt`, and the
  empty think block that `enable_thinking=false` adds);
- generation_config.json with `eos_token_id: [<|im_end|>, <|endoftext|>]`, as Qwen3's chat
  checkpoints ship it: the model ends its turn with `<|im_end|>`, not with the tokenizer's eos.

`fine_tuned_checkpoint` teaches it, with the warm start's teacher forcing (`supervised_batch`),
to answer one-digit sums and end its turn with `<|im_end|>`, then open the next turn as chat
data does: unless `<|im_end|>` stops it, it keeps talking, and its answer no longer matches.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from gspo_cli.config import TaskConfig, TinyModelSpec, WarmStartConfig
from gspo_cli.data.tasks import Problem, build_task
from gspo_cli.models.build import build_tiny_model
from gspo_cli.models.loading import load_model, load_tokenizer
from gspo_cli.models.storage import write_dir_atomically
from gspo_cli.rollout.evaluation import greedy_eval
from gspo_cli.rollout.scoring import positions_from_mask
from gspo_cli.train.warmstart import supervised_batch

END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"

# Qwen3's chat template reduced to plain text messages (no tools, no reasoning content): the
# same text for a system turn, user turns and the generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# The task the checkpoint is trained for and the tests run: one-digit sums, 20 held out.
TASK = TaskConfig(max_operand=9, num_eval=20, chat_template=True)
# The size of conftest.TEST_SPEC, with room for chat-formatted prompts.
SPEC = TinyModelSpec(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=16, intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=32, max_position_embeddings=256)
WARM_START = WarmStartConfig(target_accuracy=0.5, max_steps=400, check_every=25, batch_size=64, lr=1e-2)
VERSION = 1  # bump when the checkpoint changes, to invalidate caches


def chat_texts() -> list[str]:
    """The task's prompts and answers in chat format: what the tokenizer is trained on."""
    from gspo_cli.data.tasks import arithmetic_problems

    texts = []
    for system in ("", f"{IM_START}system\nBe brief.{IM_END}\n"):
        for p in arithmetic_problems(TASK.max_operand, "+-*"):
            texts.append(f"{system}{IM_START}user\n{p.prompt}{IM_END}\n{IM_START}assistant\n"
                         f"{THINK}\n\n{END_THINK}\n\n{p.answer}{IM_END}\n{END_OF_TEXT}")
    return texts


def build_tokenizer(vocab_size: int = 320) -> Qwen2Tokenizer:
    """A byte-level BPE trained on `chat_texts`, wrapped as Qwen3's tokenizer is."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    specials = re.compile("|".join(re.escape(t) for t in (END_OF_TEXT, IM_START, IM_END, THINK, END_THINK)))
    core.train_from_iterator([part for text in chat_texts() for part in specials.split(text) if part], trainer)
    merges = [tuple(m) for m in json.loads(core.to_str())["model"]["merges"]]  # [(left, right), ...]
    tokenizer = Qwen2Tokenizer(vocab=core.get_vocab(), merges=merges, unk_token=None, eos_token=END_OF_TEXT,
                               pad_token=END_OF_TEXT, extra_special_tokens=[IM_START, IM_END],
                               chat_template=CHAT_TEMPLATE, model_max_length=SPEC.max_position_embeddings)
    tokenizer.add_tokens([THINK, END_THINK])  # ordinary added tokens, as in Qwen3
    return tokenizer


def write_checkpoint(directory: Path) -> None:
    """The untrained checkpoint: tokenizer, random tiny Qwen3-MoE, generation config."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(SPEC, tokenizer, seed=0)
    end_of_text, im_end = tokenizer.convert_tokens_to_ids([END_OF_TEXT, IM_END])
    model.config.bos_token_id = end_of_text  # as in Qwen3's config.json
    model.generation_config = GenerationConfig(bos_token_id=end_of_text, eos_token_id=[im_end, end_of_text],
                                               pad_token_id=end_of_text)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def base_checkpoint(cache_dir: Path) -> Path:
    """The untrained checkpoint, written once into `cache_dir`."""
    target = cache_dir / "real-layout" / f"base-v{VERSION}"
    if (target / "config.json").exists():
        return target
    return write_dir_atomically(target, write_checkpoint)


def fine_tune(model, base: Path, log) -> None:
    """Teacher forcing on `answer<|im_end|>\n<|im_start|>` until greedy accuracy on the training
    prompts reaches `WARM_START.target_accuracy` (see `fine_tuned_checkpoint`)."""
    tokenizer, target_tokenizer, probe_tokenizer = load_tokenizer(base), load_tokenizer(base), load_tokenizer(base)
    target_tokenizer.eos_token, probe_tokenizer.eos_token = IM_START, IM_END  # what supervised_batch appends / stops at
    task = build_task(TASK).for_tokenizer(tokenizer)
    targets = [Problem(p.prompt, f"{p.answer}{IM_END}\n") for p in task.train]  # then <|im_start|>
    rng = random.Random(WARM_START.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=WARM_START.lr)
    model.train()
    for step in range(1, WARM_START.max_steps + 1):
        ids, mask, labels = supervised_batch(target_tokenizer, rng.sample(targets, WARM_START.batch_size))
        loss = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % WARM_START.check_every == 0:
            accuracy = greedy_eval(model, probe_tokenizer, task, task.train, 4)[0]["eval/accuracy"]
            log(f"real-layout checkpoint: step {step}, loss {loss.item():.3f}, train accuracy {accuracy:.2f}")
            if accuracy >= WARM_START.target_accuracy:
                return


def fine_tuned_checkpoint(cache_dir: Path, log=print) -> Path:
    """The checkpoint after teacher forcing on chat-formatted sums, written once into `cache_dir`:
    stopped once it answers about half of the training prompts right.

    The targets are `answer<|im_end|>\n<|im_start|>`, as in chat data where the next turn
    follows (`supervised_batch` appends the eos of a tokenizer copy whose eos is `<|im_start|>`):
    what comes after that was never taught, so a model nothing stops at `<|im_end|>` keeps
    writing turns of noise, as real checkpoints keep writing turns. Accuracy is measured
    greedily with a copy whose eos is `<|im_end|>` (as in Qwen3's chat tokenizers), so the
    probe stops there whatever the sampler makes of generation_config.json. The saved
    tokenizer keeps the Base layout (eos `<|endoftext|>`).
    """
    target = cache_dir / "real-layout" / f"fine-tuned-v{VERSION}"
    if (target / "config.json").exists():
        return target
    base = base_checkpoint(cache_dir)
    torch.manual_seed(WARM_START.seed)
    model = load_model(base, experts_implementation="default", fused_rms_norm=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread, ~10x faster on a busy machine
    try:
        fine_tune(model, base, log)
    finally:
        torch.set_num_threads(threads)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        load_tokenizer(base).save_pretrained(tmp)

    return write_dir_atomically(target, write)
