"""Rollout engines (`trainer.rollout_engine`): what samples the responses, behind one call.

- `builtin` (`generate.py`): this project's sampler, a KV cache and one forward pass per token
  in lockstep across ranks; it records an MoE's routes for Routing Replay from the sampler (R3),
  and its tests compare its tokens bit for bit. The default everywhere.
- `continuous` (`continuous.py`): transformers' continuous batching, a serving engine (paged
  KV cache, finished rows' slots reused, one prefill per group, CUDA graphs on a GPU). Not yet
  the GPU default: it becomes that once `make gpu-check` has measured it ahead (docs/performance.md).

Both return the same `Rollout`: tokens, masks, the sampler's log-probabilities, `truncated`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from gspo_cli.models.routing import MoERouting
from gspo_cli.rollout.generate import Rollout, generate_rollout

ROLLOUT_ENGINES = ("builtin", "continuous")


def engine_conflicts(engine: str, records_routes: bool, fsdp: bool) -> Optional[str]:
    """Why `engine` cannot serve this run, or None. `records_routes`: the run replays the
    sampler's experts (Routing Replay with `algo.old_logp=rollout`); `fsdp`: FSDP2 on several
    ranks, whose forward passes are collectives every rank must join in step."""
    if engine not in ROLLOUT_ENGINES:
        return f"trainer.rollout_engine={engine!r} is not one of {list(ROLLOUT_ENGINES)}"
    if engine == "continuous" and records_routes:
        return ("Routing Replay from the sampler's experts (algo.routing_replay with algo.old_logp=rollout) "
                "needs the routes each row used, which trainer.rollout_engine=continuous does not return "
                "(it batches all rows' tokens as one); use trainer.rollout_engine=builtin, or "
                "algo.old_logp=recompute to replay the recomputed π_old's experts")
    if engine == "continuous" and fsdp:
        return ("trainer.rollout_engine=continuous runs each rank's engine on its own, but FSDP2's forward "
                "passes are collectives that every rank must run in step: use trainer.rollout_engine=builtin "
                "with hardware.strategy=fsdp, or hardware.strategy=ddp")
    return None


def sample_rollout(
    engine: str,
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    generator: Optional[torch.Generator] = None,
    still_running: Callable[[bool], bool] = bool,
    routing: Optional[MoERouting] = None,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_strings: Sequence[str] = (),
    engine_options: Optional[dict] = None,
) -> Rollout:
    """One response per prompt from `engine` (arguments as `generate_rollout`'s; `still_running`
    and `routing` serve the built-in engine, `engine_options` the continuous one)."""
    if engine == "builtin":
        return generate_rollout(model, tokenizer, prompts, max_new_tokens, temperature, generator, still_running,
                                routing, top_p=top_p, top_k=top_k, stop_strings=stop_strings)
    problem = engine_conflicts(engine, routing is not None, fsdp=False)
    if problem:
        raise ValueError(problem)
    from gspo_cli.rollout.continuous import continuous_rollout

    return continuous_rollout(model, tokenizer, prompts, max_new_tokens, temperature, generator,
                              top_p=top_p, top_k=top_k, stop_strings=stop_strings, engine_options=engine_options)
