"""Scoring of responses: their log-probabilities under a model, as the trainer sees them.

The batch layout is the sampler's (`generate.py`): `[prompt (left pad) | response (right
pad)]`, response tokens in the last T columns, positions derived from the attention mask.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from gspo_cli.models import logprob_head


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: [N, L] mask -> [N, L] positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_response_tokens: int,
    temperature: float = 1.0,
    chunk_tokens: int = 0,
) -> torch.Tensor:
    """Log-probabilities of the response tokens under `model` (with gradient if enabled).

    Only the last T + 1 positions reach the output projection (`logits_to_keep`). With
    `chunk_tokens` > 0 and the log-probability head installed (`models.logprob_head`, done by
    `load_model`), the float32 logits of at most `chunk_tokens` tokens exist at a time and are
    recomputed in the backward pass; otherwise the full `[N, T, V]` logits are computed. The
    entropy of π_old is not computed here: the sampler reports it (`Rollout.entropy`).

    Args:
        input_ids, attention_mask: [N, P + T].
        num_response_tokens: T.
        temperature: the sampling temperature, so that π matches the sampler.
        chunk_tokens: response tokens (rows × positions) whose logits exist at once (0: all).

    Returns:
        logp [N, T], float32.
    """
    T = num_response_tokens
    forward = dict(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=positions_from_mask(attention_mask), logits_to_keep=T + 1)
    inner = getattr(model, "module", model)  # a DDP wrapper's model holds the head
    if chunk_tokens > 0 and logprob_head.installed(inner):
        with logprob_head.returning_logprobs(inner, input_ids[:, -T:], temperature, chunk_tokens):
            return model(**forward).logits  # [N, T]: the head returned log-probabilities
    logits = model(**forward).logits[:, :-1].float()  # [N, T, V]: position t predicts response token t
    if temperature != 1.0:
        logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1)  # [N, T, V]
    return log_probs.gather(-1, input_ids[:, -T:, None]).squeeze(-1)
