"""The output projection as a log-probability head: response log-probabilities computed a chunk
of positions at a time, from float32 logits, without a `[n, T, V]` tensor for the whole batch.

A causal LM's forward ends with `logits = lm_head(hidden[:, -k:])`. With a vocabulary of
151,936 tokens (Qwen3) the float32 logits of a micro-batch of 4 responses of 8,192 tokens
are 20 GB, and autograd keeps them, their log-softmax and their gradient. `install` rebinds
the `forward` of the model's output projection (no new module, so state-dict keys and tied
embeddings stay as they are); while `targets` is set, that forward returns the log-probability
of each target token instead of logits, computed chunk by chunk:

- each chunk's logits are computed in float32 (outside autocast), so log-probabilities keep
  float32 resolution under bf16 compute (GSPO's clip range, 3e-4, is below bf16's 4e-3 step);
- with gradients enabled each chunk runs under activation checkpointing: its logits are
  recomputed in the backward pass, so at most one chunk's `[n, C, V]` logits exist at a time
  (n·C ≤ `trainer.logprob_chunk_tokens`: 512 tokens of a 151,936-token vocabulary are 311 MB).

Because the head runs inside the model's own forward, DDP and FSDP2 see an ordinary forward
pass (FSDP2 has the root's parameters gathered while the head runs). Without `targets` the head
is the plain projection (generation).
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """[n, C, H] hidden states, [n, C] token ids -> [n, C] log-probabilities (float32).

    log p(y) = z_y − logsumexp(z): the same numbers as gathering from `log_softmax`, without a
    second vocabulary-wide tensor (the backward pass builds one, the softmax, instead of two).
    """
    with torch.autocast(hidden.device.type, enabled=False):
        logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())  # [n, C, V]
        if temperature != 1.0:
            logits = logits.div_(temperature)  # in place: the projection's backward does not need its output
        return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _forward(self: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    request = getattr(self, "gspo_targets", None)
    if request is None:
        return F.linear(hidden, self.weight, self.bias)
    targets, temperature, chunk_tokens = request
    hidden = hidden[:, -targets.shape[1] - 1:-1]  # position t predicts response token t
    chunk = max(1, chunk_tokens // max(1, targets.shape[0]))  # positions per chunk, all rows at once
    out = []
    for start in range(0, targets.shape[1], chunk):
        args = (hidden[:, start:start + chunk], targets[:, start:start + chunk], self.weight, self.bias, temperature)
        if torch.is_grad_enabled():
            out.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(*args))
    return torch.cat(out, dim=1)  # [n, T]


def install(model: torch.nn.Module) -> bool:
    """Make the model's output projection able to return log-probabilities; False if it is not
    a plain `nn.Linear` (such models keep the full-logits path)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return False
    head.forward = types.MethodType(_forward, head)
    head.gspo_targets = None
    return True


def installed(model: torch.nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and hasattr(head, "gspo_targets")


@contextlib.contextmanager
def returning_logprobs(model: torch.nn.Module, targets: torch.Tensor, temperature: float,
                       chunk_tokens: int) -> Iterator[None]:
    """While inside, the model's forward returns `[n, T]` log-probabilities of `targets` (the
    last T tokens of `input_ids`) in place of logits; it needs `logits_to_keep=T + 1`. The logits
    of at most `chunk_tokens` response tokens (rows × positions) exist at once."""
    head = model.get_output_embeddings()
    head.gspo_targets = (targets, temperature, chunk_tokens)
    try:
        yield
    finally:
        head.gspo_targets = None
