"""Mixture-of-Experts routing under RL: capture expert choices, measure their drift, replay them.

The GSPO paper (§5.3) observes that after each gradient update about 10% of the experts a
Qwen3-30B-A3B chooses for the same tokens change, which makes GRPO's per-token ratios
swing; GRPO then needs "Routing Replay": compute π_θ with the experts π_old chose.

`MoERouting` attaches one forward hook to every top-k router of a Hugging Face MoE model
(the `TopKRouter` modules of Qwen3-MoE and its relatives in transformers ≥ 5, which return
`(router_logits, top_k_weights, top_k_indices)`). Inside `capture()` the hooks record each
layer's chosen experts; inside `replay(indices)` they replace the router's choice by the
given experts, weighted by the current router's probabilities over them and renormalised
as the model itself does, so gradients still reach the router.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
from torch import nn

Routes = list[torch.Tensor]  # one [num_tokens, k] tensor of expert indices per MoE layer


def route_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer type that holds an expert index: routes of every token of every
    layer are kept for a whole rollout batch (512 × 8,192 tokens × 48 layers × top-8 at the
    paper's shapes: 1.6 GB as uint8, 12.9 GB as int64)."""
    if num_experts <= 256:
        return torch.uint8
    return torch.int16 if num_experts <= 2**15 else torch.int32


class RoutingReplayUnsupported(ValueError):
    """The model has MoE layers whose routers this module cannot capture or replay."""


def is_moe(model: nn.Module) -> bool:
    """Whether the model's config declares experts."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0))


def find_routers(model: nn.Module) -> list[nn.Module]:
    """The top-k router modules, in layer order.

    Raises:
        RoutingReplayUnsupported: the config declares experts but no supported router exists.
    """
    # Under `peft` with trainable routers (`model.lora.train_router`) each router is wrapped with a
    # trainable copy next to its frozen `original_module`; the policy runs the copy, so that is the one hooked.
    routers = [m for name, m in model.named_modules()
               if type(m).__name__.endswith("TopKRouter") and hasattr(m, "top_k") and hasattr(m, "weight")
               and ".original_module" not in name]
    if is_moe(model) and not routers:
        raise RoutingReplayUnsupported(
            f"{type(model).__name__} declares experts but has no top-k router module this tool can hook "
            "(supported: transformers >= 5 MoE models whose router returns (logits, weights, indices), "
            "such as Qwen3-MoE); routing metrics and algo.routing_replay need one")
    return routers


class MoERouting:
    """Hooks on every router of `model`: capture expert choices and optionally force them."""

    def __init__(self, model: nn.Module) -> None:
        self.routers = find_routers(model)
        self._captured: Optional[Routes] = None
        self._recorded: Optional[list[list[torch.Tensor]]] = None
        self._forced: Optional[Routes] = None
        self._handles = [router.register_forward_hook(self._hook(layer))
                         for layer, router in enumerate(self.routers)]
        self.num_experts = max((router.weight.shape[0] for router in self.routers), default=0)
        self.top_k = max((router.top_k for router in self.routers), default=0)
        self.route_dtype = route_dtype(self.num_experts)

    @property
    def num_layers(self) -> int:
        """Number of MoE layers (0 for a dense model)."""
        return len(self.routers)

    def _hook(self, layer: int):
        def hook(module: nn.Module, inputs, output):
            logits, weights, indices = output
            if self._captured is not None:
                self._captured[layer] = indices.detach().to(self.route_dtype)
            if self._recorded is not None:
                self._recorded[layer].append(indices.detach().to(self.route_dtype))
            if self._forced is None:
                return None
            forced = self._forced[layer].to(device=indices.device, dtype=indices.dtype)  # stored small, used as int64
            if forced.shape != indices.shape:
                raise ValueError(f"routing replay: layer {layer} expects routes of shape {tuple(indices.shape)}, "
                                 f"got {tuple(forced.shape)} (the batch must match the one routes were captured on)")
            probs = torch.softmax(logits, dim=-1, dtype=torch.float)
            forced_weights = probs.gather(-1, forced)
            if getattr(module, "norm_topk_prob", False):
                forced_weights = forced_weights / forced_weights.sum(-1, keepdim=True)
            return logits, forced_weights.to(weights.dtype), forced
        return hook

    @contextlib.contextmanager
    def capture(self) -> Iterator[Routes]:
        """Record every layer's [num_tokens, k] expert indices of the forward passes inside."""
        self._captured = [torch.empty(0, dtype=self.route_dtype)] * self.num_layers
        try:
            yield self._captured
        finally:
            self._captured = None

    @contextlib.contextmanager
    def record(self) -> Iterator[list[list[torch.Tensor]]]:
        """Like `capture`, but keep every forward pass's indices, in order: per layer a list
        (the sampler's prompt pass, then one [N, k] tensor per generated token)."""
        self._recorded = [[] for _ in range(self.num_layers)]
        try:
            yield self._recorded
        finally:
            self._recorded = None

    @contextlib.contextmanager
    def replay(self, routes: Routes) -> Iterator[None]:
        """Force the given expert indices in every layer during the forward passes inside."""
        if len(routes) != self.num_layers:
            raise ValueError(f"routing replay: {len(routes)} layers of routes for {self.num_layers} MoE layers")
        self._forced = routes
        try:
            yield
        finally:
            self._forced = None

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()


def routes_by_sequence(routes: Routes, batch_size: int) -> Routes:
    """Reshape captured routes from [N·L, k] to [N, L, k] so rows can be selected per sequence."""
    return [r.view(batch_size, -1, r.shape[-1]) for r in routes]


def sampler_routes(recorded: list[list[torch.Tensor]], num_seqs: int, num_response_tokens: int) -> Routes:
    """Per layer [N, P + T, k] routes of the sampled sequences, from what the sampler's
    forward passes recorded: the prompt pass ([N·P, k]) then one [N, k] per token fed back.

    The last response token is never fed back (no forward pass runs after it), so its
    column repeats the one before: it is an input whose output no log-probability uses,
    which leaves the routing metrics and Routing Replay unaffected.
    """
    routes = []
    for steps in recorded:
        prompt, fed_back = steps[0].view(num_seqs, -1, steps[0].shape[-1]), [s.view(num_seqs, 1, -1) for s in steps[1:]]
        if len(fed_back) != num_response_tokens - 1:
            raise ValueError(f"expected {num_response_tokens - 1} recorded decoding steps, got {len(fed_back)}")
        seen = torch.cat([prompt, *fed_back], dim=1)
        routes.append(torch.cat([seen, seen[:, -1:]], dim=1))
    return routes


def route_rows(routes: Routes, rows: torch.Tensor) -> Routes:
    """Routes of a subset of sequences, flattened back to [n·L, k] as a router sees them."""
    return [r[rows].reshape(-1, r.shape[-1]) for r in routes]


def changed_fraction(current: torch.Tensor, old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of (token, top-k slot) expert choices of `current` that `old` did not make.

    Choices are compared as sets per token, so two experts that only swap slots count as
    unchanged.

    Args:
        current, old: [N, L, k] expert indices of one layer.
        mask: [N, L], 1 on the tokens to count.

    Returns:
        Scalar in [0, 1].
    """
    kept = (current[..., :, None] == old[..., None, :]).any(-1).float()  # [N, L, k]
    changed_per_token = 1.0 - kept.mean(-1)  # [N, L]
    return (changed_per_token * mask).sum() / mask.sum().clamp(min=1.0)


def routing_metrics(current: Routes, old: Routes, mask: torch.Tensor) -> dict[str, float]:
    """`routing/changed_fraction` (mean over layers) and its per-layer values.

    Args:
        current, old: per layer [N, L, k].
        mask: [N, L] tokens to count (the response tokens).
    """
    per_layer = [changed_fraction(c, o, mask).item() for c, o in zip(current, old)]
    metrics = {f"routing/changed_fraction/layer_{i}": v for i, v in enumerate(per_layer)}
    if per_layer:
        metrics["routing/changed_fraction"] = sum(per_layer) / len(per_layer)
    return metrics


def volatility_metrics(per_minibatch: list[float]) -> dict[str, float]:
    """`routing/volatility`: the mean over mini-batches of the share of experts changed by one
    optimizer step (GSPO paper §5.3), and each mini-batch's value `routing/volatility/minibatch_<i>`.

    Args:
        per_minibatch: per optimizer step of one RL step, in order, the `routing/changed_fraction`
            of the same tokens routed before and after that step (no value: no metric).
    """
    if not per_minibatch:
        return {}
    metrics = {f"routing/volatility/minibatch_{i}": v for i, v in enumerate(per_minibatch)}
    metrics["routing/volatility"] = sum(per_minibatch) / len(per_minibatch)
    return metrics


def expert_load(routes: Routes, mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Each layer's expert load: the share of its (token, top-k slot) choices that went to each expert.

    Args:
        routes: per layer [N, L, k] expert indices.
        mask: [N, L], 1 on the tokens to count.
        num_experts: experts per layer.

    Returns:
        [num_layers, num_experts], each row summing to 1 (0 where no token counts).
    """
    loads = []
    for layer in routes:
        weights = mask[..., None].expand(layer.shape).reshape(-1).float()  # [N·L·k]
        counts = torch.zeros(num_experts, device=layer.device).index_add_(0, layer.reshape(-1).long(), weights)
        loads.append(counts / counts.sum().clamp(min=1.0))
    return torch.stack(loads)


def load_balance_metrics(routes: Routes, mask: torch.Tensor, num_experts: int) -> dict[str, float]:
    """How evenly the experts share the work (means over layers of `expert_load`'s rows).

    `routing/load_entropy`: the load's entropy over log(num_experts), 1 when every expert takes
    the same share, 0 when one takes all. `routing/max_load_share`: the largest expert's share,
    1/num_experts when balanced and at most 1/k under top-k routing (one expert in every token's k).

    Args:
        routes: per layer [N, L, k] expert indices.
        mask: [N, L], 1 on the tokens to count.
        num_experts: experts per layer (at least 2).
    """
    if not routes:
        return {}
    load = expert_load(routes, mask, num_experts)  # [layers, E]
    entropy = -torch.xlogy(load, load).sum(-1) / math.log(num_experts)  # 0·log 0 = 0
    return {"routing/load_entropy": entropy.mean().item(),
            "routing/max_load_share": load.max(-1).values.mean().item()}


def pooled_load_balance_metrics(routes: Routes, mask: torch.Tensor, num_experts: int) -> dict[str, float]:
    """`load_balance_metrics` of every layer's choices counted together, as one layer's (keys with
    a `_pooled` suffix): the load transformers' MoE balancing loss evens, which layers that each
    favour other experts can leave even while each layer's own load is not.

    Args: as `load_balance_metrics`.
    """
    if not routes:
        return {}
    together = load_balance_metrics([torch.cat(routes, dim=1)], mask.repeat(1, len(routes)), num_experts)
    return {f"{key}_pooled": value for key, value in together.items()}


def routes_megabytes(routes: Routes) -> float:
    """Memory held by cached routes, in MB."""
    return sum(r.numel() * r.element_size() for r in routes) / 1e6
