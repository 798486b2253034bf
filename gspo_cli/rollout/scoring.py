"""Scoring of responses: their log-probabilities under a model, as the trainer sees them.

The batch layout is the sampler's (`generate.py`): `[prompt (left pad) | response (right
pad)]`, response tokens in the last T columns, positions derived from the attention mask.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: [N, L] mask -> [N, L] positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_response_tokens: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probabilities of the response tokens under `model` (with gradient if enabled).

    Only the logits of the last T + 1 positions are computed (`logits_to_keep`). The
    entropy of π_old is not computed here: the sampler reports it (`Rollout.entropy`).

    Args:
        input_ids, attention_mask: [N, P + T].
        num_response_tokens: T.
        temperature: the sampling temperature, so that π matches the sampler.

    Returns:
        logp [N, T].
    """
    T = num_response_tokens
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=positions_from_mask(attention_mask), logits_to_keep=T + 1)
    logits = out.logits[:, :-1].float()  # [N, T, V]: position t predicts response token t
    if temperature != 1.0:
        logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1)  # [N, T, V]
    return log_probs.gather(-1, input_ids[:, -T:, None]).squeeze(-1)
