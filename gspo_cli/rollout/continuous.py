"""The `continuous` rollout engine: transformers' continuous batching (`model.generate_batch`).

transformers ships a small serving engine inside the library this project already uses: a
paged KV cache, finished rows' slots handed to waiting ones, one prefill per prompt shared by
its G samples (`num_return_sequences`), and on a GPU the decode step captured as a CUDA graph.
It runs on CPU too (slowly: it is built for GPUs), which is how the tests check it against the
built-in sampler and the trainer. Its output is turned into the same `Rollout` the trainer
consumes: prompts left-padded, responses right-padded, the stop token part of the response.

What differs from the built-in sampler (`generate.py`), and why:
- Randomness: the engine samples with torch's global generator, seeded once per call from the
  trainer's generator (`ContinuousBatchingConfig.seed`), inside `torch.random.fork_rng` so the
  global state is left as it was. The same seed gives the same rollout; the draws differ
  from the built-in sampler's.
- Stop strings: the engine stops on token ids only. A response is cut after the first token
  whose text contains a stop string, afterwards; tokens after that point never influence the
  ones before it, so the kept response is drawn from the same distribution.
- Entropy: the engine reports the sampled token's log-probability only, so `Rollout.entropy`
  holds −log p of each drawn token: its expectation is the entropy, so the `entropy` metric
  (a mean over many tokens) estimates the same quantity with sampling noise.
- Routes: the engine packs the tokens of all running rows into one varlen batch, so the
  experts an MoE router chose are not returned per row; Routing Replay from the sampler's
  routes (R3) needs the built-in engine (`loop.check_config` refuses the combination).
- Lockstep: each process runs its own engine with no collective inside, so FSDP2, whose
  forward passes are collectives, needs the built-in engine (also refused up front).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from gspo_cli.rollout.generate import Rollout, StopStrings, decode_responses, encode_prompts, stop_token_ids


def prompt_runs(prompts: Sequence[str]) -> tuple[list[str], int]:
    """(distinct prompts in order, copies of each) when `prompts` is each distinct prompt
    repeated the same number of times in a row (a rollout's G samples); else (prompts, 1)."""
    distinct, counts = [], []
    for prompt in prompts:
        if distinct and distinct[-1] == prompt:
            counts[-1] += 1
        else:
            distinct.append(prompt)
            counts.append(1)
    return (distinct, counts[0]) if len(set(counts)) == 1 else (list(prompts), 1)


def cut_at_stop_strings(tokens: torch.Tensor, mask: torch.Tensor,
                        stops: StopStrings) -> tuple[torch.Tensor, torch.Tensor]:
    """The response mask [N, T] cut after the first token whose text contains a stop string, and
    [N] bool: the rows a stop string ended.

    tokens: [N, T] response ids; mask: [N, T] 1 on the generated tokens. Checks position by
    position as the built-in sampler does while decoding (the same `StopStrings` window)."""
    cut = torch.zeros(tokens.shape[0], dtype=torch.bool)
    if not stops:
        return mask, cut
    mask = mask.clone()
    running = mask[:, 0].bool()
    for t in range(tokens.shape[1]):
        running = running & mask[:, t].bool()
        if not bool(running.any()):
            break
        hit = stops(tokens[:, :t + 1], running)
        mask[hit, t + 1:] = 0
        cut |= hit
        running = running & ~hit
    return mask, cut


def generation_config(max_new_tokens: int, temperature: float, top_p: float, top_k: int, ends: list[int],
                      pad_token_id: int, copies: int) -> GenerationConfig:
    """Every sampling field set, so nothing is taken from a checkpoint's generation_config.json
    (Qwen3's asks for temperature 0.6, top-k 20, top-p 0.95): the distribution is the run's."""
    greedy = temperature <= 0  # argmax: no warper applies (transformers warns if one is set)
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy, num_return_sequences=copies,
        temperature=None if greedy else temperature, top_p=None if greedy else top_p,
        top_k=None if greedy else top_k, eos_token_id=ends, pad_token_id=pad_token_id,
        repetition_penalty=1.0, min_new_tokens=0)


@torch.no_grad()
def continuous_rollout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    generator: Optional[torch.Generator] = None,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_strings: Sequence[str] = (),
    engine_options: Optional[dict] = None,
) -> Rollout:
    """One response per prompt (prompts repeated G times in a row share one prefill), as a
    `Rollout` with the sampler's log-probabilities (of the tempered, top-k/top-p truncated
    distribution; greedy: of the untempered one, like the built-in sampler).

    `engine_options`: extra `ContinuousBatchingConfig` fields (e.g. `max_batch_tokens`,
    `use_cuda_graph`), from `trainer.rollout_engine_options`.
    """
    from transformers import ContinuousBatchingConfig

    device = next(model.parameters()).device
    stops = StopStrings(tokenizer, stop_strings)
    ends = stop_token_ids(model, tokenizer) + stops.token_ids
    # greedy rows of one prompt are one response copied; the engine refuses copies without sampling
    distinct, copies = prompt_runs(prompts) if temperature > 0 else (list(prompts), 1)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in distinct]
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if generator is not None else 0
    sizes = cpu_sizes(len(prompts), max(map(len, encoded)) + max_new_tokens) if device.type == "cpu" else {}
    config = ContinuousBatchingConfig(return_logprobs=True, seed=seed, **{**sizes, **(engine_options or {})})
    gen = generation_config(max_new_tokens, temperature, top_p, top_k, ends, tokenizer.pad_token_id, copies)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), quiet_progress():
        outputs = list(model.generate_batch(encoded, generation_config=gen, continuous_batching_config=config,
                                            progress_bar=False).values())
    failed = [o.request_id for o in outputs if o.error is not None]
    if len(outputs) != len(prompts) or failed:
        raise RuntimeError(f"continuous batching returned {len(outputs)} of {len(prompts)} responses"
                           f"{f', {len(failed)} failed: ' + str(failed[:3]) if failed else ''}; "
                           "trainer.rollout_engine=builtin avoids the engine")
    width = max(1, max(len(o.generated_tokens) for o in outputs))
    tokens = torch.full((len(outputs), width), tokenizer.pad_token_id, dtype=torch.long)
    logp = torch.zeros(len(outputs), width)
    mask = torch.zeros(len(outputs), width)
    for i, out in enumerate(outputs):
        n = len(out.generated_tokens)
        tokens[i, :n] = torch.tensor(out.generated_tokens, dtype=torch.long)
        logp[i, :n] = torch.tensor(out.logprobs[:n])
        mask[i, :n] = 1.0
    mask, cut = cut_at_stop_strings(tokens, mask, stops)
    lengths = mask.sum(1).long()
    width = max(1, int(lengths.max()))  # as the built-in sampler: as wide as the longest response
    tokens, mask, logp = tokens[:, :width], mask[:, :width], logp[:, :width]
    last = tokens.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    truncated = (lengths >= max_new_tokens) & ~torch.isin(last, torch.tensor(ends)) & ~cut
    tokens = tokens.masked_fill(mask == 0, tokenizer.pad_token_id)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, str(device))
    tokens, mask, logp = tokens.to(device), mask.to(device), logp.to(device)
    return Rollout(
        input_ids=torch.cat([prompt_ids, tokens], dim=1),
        attention_mask=torch.cat([prompt_mask, mask.long()], dim=1),
        response_mask=mask,
        completions=decode_responses(tokenizer, tokens, mask),
        logp=logp * mask,
        entropy=-logp * mask,  # −log p of the drawn token: an unbiased estimate of the entropy
        routes=None,
        truncated=truncated.to(device),
    )


def cpu_sizes(num_rows: int, row_tokens: int, page_size: int = 32) -> dict[str, int]:
    """The engine's sizes for a CPU run: room for every row's whole sequence, in small pages.

    Left to itself the engine sizes its cache from the memory it finds free (GBs of host
    memory on a CPU) and, without a flash kernel, allocates a dense attention mask of
    `max_batch_tokens` squared: 18 s of filling buffers per call for a 12-row test batch."""
    return {"page_size": page_size, "num_blocks": num_rows * -(-row_tokens // page_size) + 1,
            "max_batch_tokens": 256}


@contextlib.contextmanager
def quiet_progress():
    """The engine logs its setup at INFO and warns about its own defaults on every call; a
    training run calls it every step, so only errors come through."""
    import logging

    from transformers.utils import logging as hf_logging

    engine_log = logging.getLogger("ContinuousBatchingLogger")  # transformers' engine logs to its own logger
    before, engine_before = hf_logging.get_verbosity(), engine_log.level
    hf_logging.set_verbosity_error()
    engine_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
        engine_log.setLevel(engine_before)
