"""Host memory of long responses with Qwen3's 151,936-token vocabulary (issue 17): what a
rollout keeps must not grow with the vocabulary at every decoded token."""

import json
import subprocess
import sys

import pytest

# Run in a child process: its resident memory is its own, not the test session's.
GENERATE = """
import json, sys, torch
from pathlib import Path
from gspo_cli.config import ModelConfig, TinyModelSpec
from gspo_cli.models.build import built_model_dir
from gspo_cli.models.loading import load_model, load_tokenizer
from gspo_cli.models.routing import MoERouting
from gspo_cli.rollout.generate import generate_rollout

def resident_gib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**30

torch.set_num_threads(1)
spec = TinyModelSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                     intermediate_size=128, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                     max_position_embeddings=640, vocab_size=151936)
path = built_model_dir(ModelConfig(name="vocab-qwen3", build=spec), Path(sys.argv[1]))
model, tokenizer = load_model(path).eval(), load_tokenizer(path)
before = resident_gib()
rollout = generate_rollout(model, tokenizer, ["1+2="] * 8, 512, 1.0, torch.Generator().manual_seed(0),
                           routing=MoERouting(model))
print(json.dumps({"kept_gib": resident_gib() - before, "tokens": rollout.response_mask.sum().item()}))
"""


@pytest.mark.slow  # ~1 minute: 512 decoding steps over a 151,936-token vocabulary
def test_a_long_rollout_keeps_no_vocabulary_sized_memory_per_token(tmp_path):
    """8 responses of 512 tokens: the logits of one step are 4.9 MB, and a sampler that let
    them pile up (or fragment the C heap around what it keeps of each step, as the first
    version did: +2.5 GB here, +8 GB at 1,024 tokens) would keep gigabytes. The rollout
    itself is 8 × 512 numbers per field."""
    done = subprocess.run([sys.executable, "-c", GENERATE, str(tmp_path)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tokens"] > 8 * 400  # random weights: most responses run to the limit
    assert result["kept_gib"] < 0.5, result
