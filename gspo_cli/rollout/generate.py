"""Rollouts: batched sampling with a KV cache; what the sampler saw comes back with the tokens.

Prompts are left-padded, responses right-padded, so a batch of sequences is
`[prompt (left pad) | response (right pad)]` and the response tokens sit in the last
T columns. Positions are derived from the attention mask in every forward pass, so
sampling and scoring (`scoring.py`) see the same positions, so π_old matches the sampler.

A response ends at the first of the model's stop tokens (every id of its
`generation_config.eos_token_id`, and the tokenizer's end-of-sequence token) or once its text
contains one of the `stop_strings`; the token that ends it is part of the response. One that
reaches `max_new_tokens` first is marked `truncated`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from gspo_cli.models.routing import MoERouting, sampler_routes
from gspo_cli.rollout.scoring import positions_from_mask

try:  # the per-layer cache classes of transformers >= 4.56
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover - older layouts fall back to DynamicCache
    DynamicLayer = None


class Rollout(NamedTuple):
    """A batch of sampled responses (N = prompts × G sequences, T response tokens)."""

    input_ids: torch.Tensor  # [N, P + T] prompt then response token ids
    attention_mask: torch.Tensor  # [N, P + T] 1 on real tokens
    response_mask: torch.Tensor  # [N, T] float, 1 on response tokens (end-of-sequence included)
    completions: list[str]  # N decoded responses, without special tokens (the end token among them)
    logp: Optional[torch.Tensor] = None  # [N, T] the sampler's log-probabilities of the sampled tokens
    entropy: Optional[torch.Tensor] = None  # [N, T] the sampler's entropy at each response position
    routes: Optional[list[torch.Tensor]] = None  # per MoE layer [N, P + T, k] experts the sampler chose
    truncated: Optional[torch.Tensor] = None  # [N] bool, cut at max_new_tokens before any stop token or string


class Sampled(NamedTuple):
    """What `sample_with_logprobs` returns (N sequences, T ≤ max_new_tokens response tokens)."""

    tokens: torch.Tensor  # [N, T] sampled ids, pad after a sequence's end
    mask: torch.Tensor  # [N, T] float, 1 up to and including the token that ended the sequence
    logp: torch.Tensor  # [N, T] log-probability of each token under the distribution it was drawn from
    entropy: torch.Tensor  # [N, T] entropy of that distribution
    truncated: torch.Tensor  # [N] bool, still running after max_new_tokens tokens


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_class: type) -> str:
    """Name of the KV-cache argument: `cache` in recent transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class _PreallocatedLayer(DynamicLayer or object):
    """A KV-cache layer that writes each step into buffers of the final length.

    transformers' `DynamicLayer` grows its tensors with `torch.cat`, copying the whole
    cache at every generated token: on CPU that copy was a third of a decoding step. The
    keys and values handed to attention are views of the filled part, so the attention
    inputs, and therefore the sampled tokens, are the same as with `DynamicCache`.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            batch, heads, _, dim = key_states.shape
            self._key_buffer = key_states.new_empty(batch, heads, self.capacity, dim)
            self._value_buffer = value_states.new_empty(batch, value_states.shape[1], self.capacity,
                                                        value_states.shape[-1])
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot take position {end - 1}")
        self._key_buffer[:, :, self.length:end] = key_states
        self._value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values


def make_kv_cache(capacity: int) -> DynamicCache:
    """A `DynamicCache` whose layers preallocate `capacity` positions (plain one if unsupported)."""
    cache = DynamicCache()
    if DynamicLayer is not None and getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = functools.partial(_PreallocatedLayer, capacity)
    return cache


def sample_from_probs(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row drawn from `probs` [N, V] by inverting the cumulative distribution: [N].

    `torch.multinomial` draws V exponential variates per row; this draws one uniform per
    row and searches the running sum, which on CPU made sampling 5x cheaper. Tokens of
    probability 0 occupy an empty interval of the running sum and are never drawn.
    """
    cdf = probs.cumsum(-1)  # [N, V]
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k, then top-p (nucleus) filtering of [N, V] logits: tokens left out get -inf.

    Top-k keeps the k most likely tokens (ties with the k-th kept too); top-p keeps the
    smallest set of most likely tokens whose probability reaches `top_p` (at least one token),
    in the order and with the rule of transformers' `TopKLogitsWarper` and `TopPLogitsWarper`.
    A softmax of the result is the renormalised distribution the sampler draws from.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the more likely tokens
        drop = mass_before >= top_p  # the tokens before already reach top_p; the first is always kept
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a response: the model's `generation_config.eos_token_id` (an int or a
    list, as in generation_config.json) and the tokenizer's end-of-sequence token.

    Chat checkpoints end a turn with another token than their tokenizer's eos: Qwen3 lists
    `[<|im_end|>, <|endoftext|>]` while its Base tokenizers' eos is `<|endoftext|>`."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += list(configured) if isinstance(configured, (list, tuple)) else [configured]
    return sorted({int(i) for i in ids if i is not None})


class StopStrings:
    """Finds responses whose text has come to contain one of `strings`.

    A string that is a whole added token of the tokenizer (`<|im_end|>`) is matched by its
    id (`token_ids`), with no decoding. For the others only the last few tokens are decoded
    at each step, special tokens written out: a string of L characters ends within the
    last 4·L tokens, since every token holds at least one byte of UTF-8.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, strings: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        added = tokenizer.get_added_vocab()  # token text -> id
        self.token_ids = sorted({added[s] for s in strings if s in added})
        self.strings = tuple(s for s in strings if s and s not in added)
        self.window = 4 * max((len(s) for s in self.strings), default=0)

    def __bool__(self) -> bool:
        return bool(self.strings)

    def __call__(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """tokens: [N, T'] the response tokens so far; rows: [N] bool, the rows to check.
        Returns [N] bool: rows whose recent text contains a stop string."""
        hit = torch.zeros_like(rows)
        if not bool(rows.any()):
            return hit
        checked = rows.nonzero().squeeze(1)
        recent = tokens[checked, -self.window:]  # [n, ≤ window]
        texts = self.tokenizer.batch_decode(recent.tolist(), skip_special_tokens=False,
                                           clean_up_tokenization_spaces=False)
        found = torch.tensor([any(s in text for s in self.strings) for text in texts], device=rows.device)
        return hit.index_put_((checked,), found)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize and left-pad prompts: returns ([N, P] ids, [N, P] mask)."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


@torch.no_grad()
def sample_with_logprobs(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    generator: Optional[torch.Generator] = None,
    still_running: Callable[[bool], bool] = bool,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_strings: Optional[StopStrings] = None,
) -> Sampled:
    """Sample responses token by token with a KV cache until every sequence has ended (temperature
    0: greedy), returning also what the sampler saw: the log-probability of each sampled
    token and the entropy of the distribution it was drawn from (both under `temperature`,
    and `top_k`/`top_p` when set: the truncated, renormalised distribution; greedy decoding
    reports the untempered, unfiltered distribution).

    A sequence ends with the first token in `eos_token_id` (one id or several) or, with
    `stop_strings`, the first token after which its text contains one of them; that token is
    part of the response (mask 1), the padding after it is not, whether or not the pad token
    is also an end token.

    These are π_old as an inference engine reports it (`algo.old_logp=rollout`), which the
    trainer's recomputed log-probabilities can be compared with.

    `still_running(any_alive)` decides whether to continue; under FSDP every rank must run
    the same number of forward passes, so the trainer passes a function that asks all ranks.

    No forward pass runs after the last token (its logits would never be used). Sequences
    that have ended stay in the batch: a forward pass over fewer rows can round differently
    in the last bit, and the sampled tokens must not depend on which other rows are still
    running (tests/test_perf.py compares the tokens with a plain loop, bit for bit).

    Returns:
        `Sampled`: logp and entropy hold values at masked positions too, to be ignored.
    """
    if not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] and top_k={top_k} at least 0 (0: off)")
    filtered = temperature > 0 and (top_p < 1.0 or top_k > 0)
    ends = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                        device=prompt_ids.device)
    N, P = prompt_ids.shape
    cache = {_cache_kwarg(type(model)): make_kv_cache(P + max_new_tokens)}
    # The whole mask is allocated once and sliced, rather than grown by a copy every token.
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_zeros(N, max_new_tokens)], dim=1)  # [N, P + T]
    positions = positions_from_mask(prompt_mask)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                use_cache=True, **cache, logits_to_keep=1)
    logits = out.logits[:, -1].float()  # [N, V]
    positions = positions[:, -1:]  # [N, 1]
    finished = torch.zeros(N, dtype=torch.bool, device=prompt_ids.device)
    # What each step keeps is written into buffers allocated once: small tensors appended at
    # every step would settle into the holes the step's [N, V] temporaries leave in the C heap,
    # and with a 151,936-token vocabulary that fragmentation grew the heap by ~8 MB per token.
    tokens = prompt_ids.new_full((N, max_new_tokens), pad_token_id)
    alive, token_logps, entropies = (torch.zeros(N, max_new_tokens, device=prompt_ids.device) for _ in range(3))
    steps = 0
    for t in range(max_new_tokens):
        scaled = logits / temperature if temperature > 0 else logits
        if filtered:  # the distribution drawn from, and reported, is the truncated one
            scaled = filter_logits(scaled, top_k, top_p)
        log_probs = torch.log_softmax(scaled, dim=-1)
        probs = torch.softmax(scaled, dim=-1)  # drawn from, and reused for the entropy (no second exp)
        if temperature > 0:
            next_token = sample_from_probs(probs, generator)
        else:
            next_token = logits.argmax(dim=-1)
        token_logps[:, t] = log_probs.gather(1, next_token[:, None]).squeeze(1)
        # 0 · log 0 = 0 for the tokens filtered out (the unfiltered product keeps its bits).
        entropies[:, t] = -torch.special.xlogy(probs, probs).sum(-1) if filtered else -(probs * log_probs).sum(-1)
        next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
        tokens[:, t] = next_token
        alive[:, t] = (~finished).float()
        steps = t + 1
        ended = torch.isin(next_token, ends)
        if stop_strings:
            ended = ended | stop_strings(tokens[:, :steps], ~finished & ~ended)
        finished = finished | ended
        attention_mask[:, P + t] = (~finished).to(attention_mask.dtype)
        if t == max_new_tokens - 1 or not still_running(not bool(finished.all())):
            break  # the logits a further forward pass would give are never used
        positions = positions + 1
        out = model(input_ids=next_token[:, None], attention_mask=attention_mask[:, : P + t + 1],
                    position_ids=positions, use_cache=True, **cache)
        logits = out.logits[:, -1].float()
    return Sampled(tokens[:, :steps].clone(), alive[:, :steps].clone(), token_logps[:, :steps].clone(),
                   entropies[:, :steps].clone(), ~finished)


def decode_responses(tokenizer: PreTrainedTokenizerBase, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Decode each response's tokens, dropping padding and special tokens."""
    return [
        tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
        for ids, mask in zip(response_ids, response_mask)
    ]


def generate_rollout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    generator: Optional[torch.Generator] = None,
    still_running: Callable[[bool], bool] = bool,
    routing: Optional[MoERouting] = None,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_strings: Sequence[str] = (),
) -> Rollout:
    """Sample one response per prompt (repeat prompts G times for groups) and decode them.

    Responses end at the model's stop tokens (`stop_token_ids`) or `stop_strings`. With
    `routing` (hooks on an MoE model's routers) the rollout also carries the experts the
    sampler chose for every token: π_old's routes when its log-probabilities are used as
    π_old (`algo.old_logp=rollout`).
    """
    device = str(next(model.parameters()).device)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    stops = StopStrings(tokenizer, stop_strings)
    with routing.record() if routing else contextlib.nullcontext() as recorded:
        sampled = sample_with_logprobs(
            model, prompt_ids, prompt_mask, max_new_tokens,
            eos_token_id=stop_token_ids(model, tokenizer) + stops.token_ids, pad_token_id=tokenizer.pad_token_id,
            temperature=temperature, generator=generator, still_running=still_running,
            top_p=top_p, top_k=top_k, stop_strings=stops,
        )
    routes = None if recorded is None else sampler_routes(recorded, len(prompts), sampled.tokens.shape[1])
    return Rollout(
        input_ids=torch.cat([prompt_ids, sampled.tokens], dim=1),
        attention_mask=torch.cat([prompt_mask, sampled.mask.long()], dim=1),
        response_mask=sampled.mask,
        completions=decode_responses(tokenizer, sampled.tokens, sampled.mask),
        logp=sampled.logp,
        entropy=sampled.entropy,
        routes=routes,
        truncated=sampled.truncated,
    )
