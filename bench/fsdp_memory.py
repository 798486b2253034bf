"""Per-rank peak memory of FSDP2 training, measured against docs/scaling-out.md's formula.

docs/scaling-out.md sizes `experiment=qwen3-moe-gsm8k` (Qwen3-30B-A3B, 8 GPUs) with a formula of
per-rank terms: sharded parameters, gradients and AdamW moments, the layers FSDP2 gathers, the
gradient buffers of its reduce-scatters, activations under gradient checkpointing, the
log-probability head's chunk, the KV cache and the routes. `formula` below is that formula:

    python -m bench.fsdp_memory --preset        # its terms for the preset, composed from conf/
    python -m bench.fsdp_memory --count-layer   # one Qwen3-30B-A3B layer's saved activations, counted

The same function, evaluated for the benchmark MoE (`model=bench-qwen3-moe` with Qwen3's
151,936-token vocabulary) and the run's settings (float32 compute on CPU: no bf16 copies), is
compared with what 2 gloo processes measure over 2 RL steps (~5 minutes on 2 busy cores):

    python -m bench.fsdp_memory                        # glibc's allocator as a CPU run has it
    python -m bench.fsdp_memory --return-freed         # every block of 128 KiB or more unmapped when freed
    python -m bench.fsdp_memory -- algo=grpo-replay    # more overrides after --

Each rank records its peak resident memory per phase (`VmHWM` of /proc/self/status, reset at
every phase boundary through /proc/self/clear_refs; `ru_maxrss` would inherit the launcher's
peak across fork+exec), what glibc holds at each boundary (`mallinfo2`: in use, and freed but
kept), and its resident memory after imports and the process group's start-up, before any model:
the process baseline, the one measured term the formula adds. Prints measured against formula
per rank and phase, and appends one JSON line to `--out`.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9
QWEN3_VOCAB = 151936

# The run measured on the CPU: small enough for ~5 minutes on 2 busy cores; with Qwen3's vocabulary
# the state (65M parameters) and the head's chunk outweigh the process baseline.
CPU_OVERRIDES = [
    "model=bench-qwen3-moe", f"model.build.vocab_size={QWEN3_VOCAB}", "model.build.max_position_embeddings=192",
    "model.gradient_checkpointing=true", "hardware=cpu-2proc", "hardware.strategy=fsdp",
    "hardware.keep_freed_memory=false",  # the CPU default above 256 tokens: no heap kept at its high-water mark
    "trainer.prompts_per_step=8", "trainer.group_size=4", "trainer.max_new_tokens=128",
    "trainer.num_minibatches=2", "trainer.micro_batch_tokens=1024", "trainer.logprob_chunk_tokens=512",
    "trainer.max_steps=2", "trainer.eval_every=100", "task.num_eval=2", "trainer.save_final=false", "logger=none",
]


# A fixed threshold also turns off glibc's dynamic one (which rises to 32 MiB after the first frees).
RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


# ---------------------------------------------------------------------------- the formula


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the formula needs of a Qwen3-MoE model."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    expert_width: int
    vocab: int
    tied: bool

    @property
    def layer_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * q * 2 + self.hidden * kv * 2 + 2 * self.head_dim  # q, o; k, v; q/k norms
        experts = self.experts * 3 * self.hidden * self.expert_width
        return attention + experts + self.experts * self.hidden + 2 * self.hidden  # + router, two norms

    @property
    def root_params(self) -> int:
        """Embeddings, output projection (unless tied) and final norm: FSDP2's root group."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def layer_activation_bytes(self, c: int) -> int:
        """Bytes per token that one decoder layer's forward saves for its backward, at compute
        width `c` (2: bf16, 4: float32), counted from transformers 5.25's Qwen3-MoE layer (SDPA
        attention, grouped_mm experts, unfused RMSNorm; `--count-layer` counts them with
        autograd's saved-tensor hooks):
        - the RMSNorms' float32 copies of their inputs (both layer norms, q and k norms; none when
          computing in float32);
        - attention: q, its rotation, k and v repeated to every query head, the attention output
          and its copy for o_proj (5 q); the norms' outputs, the router's input and the residual (4 h);
          k, its rotation, v (3 kv); the router's float32 logits;
        - each of the top-k slots: the token's copy and the expert's output (2 h), gate/up,
          SiLU and product (4 × expert width)."""
        q, kv, h = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden
        norm_copies = 4 * (q + 2 * h + kv) if c < 4 else 0
        return (norm_copies + c * (5 * q + 4 * h + 3 * kv) + 4 * self.experts
                + c * self.top_k * (2 * h + 4 * self.expert_width))

    def layer_gradient_bytes(self, c: int) -> int:
        """Bytes per token of the largest gradients a layer's backward holds besides its saved
        tensors: those of the experts' gate/up output and of the tokens' copies (k × (2F + h))."""
        return c * self.top_k * (2 * self.expert_width + self.hidden)


@dataclasses.dataclass(frozen=True)
class Run:
    """The settings the formula reads (per rank)."""

    world: int
    compute_bytes: int  # 2 under bf16 (FSDP2's param_dtype), 4 in float32
    rollout_rows: int  # trainer.rollout_batch_size (this rank's rows at a time)
    prompt_tokens: int  # the longest prompt (rows are padded to it)
    response_tokens: int  # trainer.max_new_tokens
    micro_tokens: int  # trainer.micro_batch_tokens: padded tokens of one training pass
    chunk_tokens: int  # trainer.logprob_chunk_tokens
    gather_for_rollout: bool
    routes_rows: int  # rows whose π_old routes a rank keeps (its whole rollout batch)
    gradient_checkpointing: bool = True

    @property
    def row_tokens(self) -> int:
        return self.prompt_tokens + self.response_tokens


def formula(s: Shape, r: Run) -> dict[str, dict[str, float]]:
    """Per-rank bytes of each term, by phase:
    - `rollout`: sampling in steady state (AdamW's moments exist; the gradients were freed after
      the last update). The in-loop evaluation is the same with its own row count.
    - `first rollout`: the same before the first optimizer step (no moments yet).
    - `update`: a training pass after the first optimizer step. Its peak is in the backward
      pass, at the larger of two moments: the head's (its chunk's float32 logits, their softmax
      and gradient, ~4 chunks of logits; under bf16 also the float32 copy of the output projection
      and that copy's float32 gradient) and a decoder layer's (its activations recomputed, the
      gradients its backward makes, and its unsharded gradient plus the reduce-scatter's float32
      input). What a pass keeps (every layer's input under gradient checkpointing, every layer's
      activations without it) is held at both.
    Masters, gradients and moments are float32; gathered parameters, activations and the KV cache
    are in the compute dtype (bf16 under FSDP2's mixed precision)."""
    c, W, P = r.compute_bytes, r.world, s.params
    layer_c, root_c = c * s.layer_params, c * s.root_params
    sharded = {"parameters (fp32 masters, sharded)": 4 * P / W, "AdamW moments (fp32, sharded)": 8 * P / W,
               "routes of π_old (uint8)": r.routes_rows * r.row_tokens * s.layers * s.top_k}
    # gathered while a pass runs: the root (embeddings, head; FSDP2 keeps the root gathered to the
    # end of the backward), the layer that runs, the one prefetched and the all-gather buffer of a third
    gathered = root_c + 3 * layer_c
    rollout = dict(sharded)
    rollout["gathered parameters (compute dtype)"] = c * P if r.gather_for_rollout else gathered
    rollout["KV cache"] = r.rollout_rows * r.row_tokens * s.layers * 2 * s.kv_heads * s.head_dim * c
    # the prompts' pass: one MoE layer's tokens copied per slot, their outputs and the re-ordered sum
    rollout["prompt pass, one layer (no gradient)"] = r.rollout_rows * r.prompt_tokens * 3 * s.top_k * s.hidden * c
    rollout["sampler's per-token logits (~4 × rows × vocab, fp32)"] = 4 * r.rollout_rows * s.vocab * 4
    first = {k: (0.0 if k.startswith("AdamW") else v) for k, v in rollout.items()}

    update = dict(sharded)
    update["gradients (fp32, sharded after every micro-batch)"] = 4 * P / W
    update["gathered: root + 3 layers (compute dtype)"] = gathered
    update["output projection's gradient (unsharded, compute dtype)"] = c * s.vocab * s.hidden
    per_layer = s.layer_activation_bytes(c)
    kept = r.micro_tokens * (s.layers * s.hidden * c if r.gradient_checkpointing else s.layers * per_layer)
    update["activations kept by the pass"] = kept
    head = 4 * r.chunk_tokens * s.vocab * 4 + (2 * 4 * s.vocab * s.hidden if c < 4 else 0)
    recomputed = r.micro_tokens * per_layer if r.gradient_checkpointing else 0
    layer = recomputed + r.micro_tokens * s.layer_gradient_bytes(c) + (c + 4) * s.layer_params
    update["backward: max(head chunk, layer recomputed + gradients + reduce-scatter)"] = max(head, layer)
    return {"first rollout": first, "rollout": rollout, "update": update,
            "detail": {"head chunk": head, "layer": layer, "layer recomputed": recomputed,
                       "layer activation bytes per token": per_layer,
                       "layer gradient buffers": (c + 4) * s.layer_params}}


def peaks(terms: dict[str, dict[str, float]], baseline: float = 0.0) -> dict[str, float]:
    return {phase: baseline + sum(terms[phase].values()) for phase in PHASES}


PHASES = ("first rollout", "rollout", "update")


QWEN3_30B_A3B = Shape(layers=48, hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128, top_k=8,
                      expert_width=768, vocab=QWEN3_VOCAB, tied=False)


GSM8K_PROMPT_TOKENS = 256  # assumed longest GSM8K prompt in Qwen3's chat template (not measured here)


def preset_run(*overrides: str) -> Run:
    """The formula's settings of `experiment=qwen3-moe-gsm8k` (64 prompts × 16 = 1,024 responses of
    ≤ 1,024 tokens on 8 ranks: 128 rows each), composed from conf/ with `overrides`."""
    return run_of(compose(["experiment=qwen3-moe-gsm8k", *overrides]), GSM8K_PROMPT_TOKENS)


def print_terms(terms: dict[str, dict[str, float]], baseline: float = 0.0) -> None:
    for phase in PHASES:
        print(f"{phase}:")
        for name, value in terms[phase].items():
            print(f"  {name:<75} {value / GB:8.3f} GB")
        print(f"  {'total' + (' (with the process baseline)' if baseline else ''):<75} "
              f"{(baseline + sum(terms[phase].values())) / GB:8.3f} GB")
    detail = terms["detail"]
    print(f"  head chunk {detail['head chunk'] / GB:.3f} GB; layer {detail['layer'] / GB:.3f} GB (recomputed "
          f"{detail['layer recomputed'] / GB:.3f} GB at {detail['layer activation bytes per token'] / 1e3:.0f} KB "
          f"per token, gradient buffers {detail['layer gradient buffers'] / GB:.3f} GB)")


def count_layer_activations(shape: Shape, dtype: str = "bfloat16", rows: int = 2, tokens: int = 256) -> int:
    """Bytes per token one Qwen3-MoE decoder layer of `shape` saves for its backward, counted with
    autograd's saved-tensor hooks (distinct storages; the parameters, the attention mask and the
    rotary tables, shared by every layer, left out). On CPU: SDPA and grouped_mm take their CPU
    kernels; a GPU's save the same tensors up to the attention kernel's statistics."""
    import torch
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer, Qwen3MoeRotaryEmbedding

    config = Qwen3MoeConfig(hidden_size=shape.hidden, num_attention_heads=shape.heads,
                            num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, num_experts=shape.experts,
                            num_experts_per_tok=shape.top_k, moe_intermediate_size=shape.expert_width,
                            vocab_size=shape.vocab, num_hidden_layers=1, norm_topk_prob=True)
    config._attn_implementation, config._experts_implementation = "sdpa", "grouped_mm"
    torch.manual_seed(0)
    dtype = getattr(torch, dtype)
    torch.set_default_dtype(dtype)  # no float32 copy of the experts on the way
    try:
        layer = Qwen3MoeDecoderLayer(config, 0)
    finally:
        torch.set_default_dtype(torch.float32)
    x = torch.randn(rows, tokens, shape.hidden, dtype=dtype, requires_grad=True)
    positions = torch.arange(tokens)[None].expand(rows, tokens)
    cos, sin = Qwen3MoeRotaryEmbedding(config)(x, positions)
    mask = torch.ones(rows, 1, tokens, tokens, dtype=torch.bool).tril()
    shared = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), mask, cos, sin)}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in shared:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions)
    return sum(saved.values()) // (rows * tokens)


# ---------------------------------------------------------------------------- the measurement


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_bytes() -> dict[str, int]:
    """glibc's view (all arenas): bytes handed out and not freed (`in_use`: heap blocks + mmapped
    blocks), and bytes freed but kept in the heap (`free`), which stay resident until reused."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {"in_use": info.uordblks + info.hblkhd, "free": info.fordblks}


def status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


class PhasePeaks:
    """Peak resident memory of each stretch of the run, named by the phase that just ended."""

    def __init__(self) -> None:
        self.events: list[dict] = []  # in order: phase, its peak and what was resident at its end (bytes), seconds
        self.started = time.perf_counter()
        self.reset()

    def reset(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        self.started = time.perf_counter()

    def close(self, name: str) -> None:
        event = {"phase": name, "peak": status_kib("VmHWM") * 1024, "after": status_kib("VmRSS") * 1024,
                 "seconds": round(time.perf_counter() - self.started, 1),
                 **{f"malloc_{k}_after": v for k, v in malloc_bytes().items()}}
        self.events.append(event)
        if os.environ.get("FSDP_MEMORY_TRACE"):
            print(f"rank {os.environ.get('RANK')} {name}: peak {event['peak'] / GB:.3f} GB, after "
                  f"{event['after'] / GB:.3f} GB (malloc: in use {event.get('malloc_in_use_after', 0) / GB:.3f}, "
                  f"free {event.get('malloc_free_after', 0) / GB:.3f}), {event['seconds']} s", flush=True)
        self.reset()

    def wrap(self, module, name: str, label: str) -> None:
        inner = getattr(module, name)

        def wrapped(*args, **kwargs):
            self.close("between phases")
            try:
                return inner(*args, **kwargs)
            finally:
                self.close(label)
        setattr(module, name, wrapped)


def worker(run_dir: Path) -> None:
    """One torchrun rank: the baseline after imports and init, then the run with phase peaks."""
    import gc

    import torch  # noqa: F401
    import torch.distributed as dist
    import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401  (what loading imports)

    from gspo_cli.launch import read_resolved_config
    from gspo_cli.train import loop
    from gspo_cli.train.host import configure_host

    cfg = read_resolved_config(run_dir)
    configure_host(cfg.hardware.num_threads, cfg.hardware.keep_freed_memory, cfg.hardware.device,
                   cfg.trainer.max_new_tokens)
    dist.init_process_group("gloo")  # loop.train's init_distributed finds it started
    gc.collect()
    baseline = status_kib("VmRSS") * 1024
    phases = PhasePeaks()
    phases.close("start-up")
    phases.wrap(loop, "evaluate", "evaluation")
    phases.wrap(loop, "collect_rollout", "rollout")
    phases.wrap(loop, "update_policy", "update")
    phases.wrap(loop, "setup", "loading")
    loop.train(cfg, run_dir)
    phases.close("end")
    rank = int(os.environ["RANK"])
    (run_dir / f"memory-rank{rank}.json").write_text(json.dumps({"rank": rank, "baseline": baseline,
                                                                 "events": phases.events}))


def measured_phases(events: list[dict]) -> dict[str, int]:
    """The formula's phases among a rank's events: the first rollout, later rollouts, every update."""
    rollouts = [e["peak"] for e in events if e["phase"] == "rollout"]
    measured = {"first rollout": rollouts[0]} if rollouts else {}
    if len(rollouts) > 1:
        measured["rollout"] = max(rollouts[1:])
    updates = [e["peak"] for e in events if e["phase"] == "update"]
    if updates:
        measured["update"] = max(updates)
    return measured


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return done.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from gspo_cli.cli import CONF_DIR
    from gspo_cli.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose(config_name="train", overrides=overrides))


def shape_of(cfg) -> Shape:
    b = cfg.model.build
    return Shape(layers=b.num_hidden_layers, hidden=b.hidden_size, heads=b.num_attention_heads,
                 kv_heads=b.num_key_value_heads, head_dim=b.head_dim, experts=b.num_experts,
                 top_k=b.num_experts_per_tok, expert_width=b.moe_intermediate_size, vocab=b.vocab_size, tied=True)


def run_of(cfg, prompt_tokens: int) -> Run:
    """The formula's settings from a composed `TrainConfig` (prompts of up to `prompt_tokens`)."""
    tc, hw = cfg.trainer, cfg.hardware
    world = hw.nproc_per_node * hw.nnodes
    rows = tc.prompts_per_step // world * tc.group_size
    row_tokens = prompt_tokens + tc.max_new_tokens
    # without a token budget a pass is micro_batch_size rows (0: the whole mini-batch) of the longest row
    micro_tokens = tc.micro_batch_tokens or (tc.micro_batch_size or rows // tc.num_minibatches) * row_tokens
    return Run(world=world, compute_bytes=2 if hw.precision == "bf16" else 4,
               rollout_rows=min(tc.rollout_batch_size or rows, rows), prompt_tokens=prompt_tokens,
               response_tokens=tc.max_new_tokens, micro_tokens=micro_tokens, chunk_tokens=tc.logprob_chunk_tokens,
               gather_for_rollout=hw.gather_for_rollout, routes_rows=rows,
               gradient_checkpointing=cfg.model.gradient_checkpointing)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="store_true", help="print the formula for experiment=qwen3-moe-gsm8k")
    parser.add_argument("--count-layer", action="store_true",
                        help="count one Qwen3-30B-A3B layer's saved activations in bf16 (~30 s, 3 GB)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one torchrun rank
    parser.add_argument("--prompt-tokens", type=int, default=16, help="longest prompt of the task (KV cache, routes)")
    parser.add_argument("--return-freed", action="store_true",
                        help="glibc: serve every block of 128 KiB or more with mmap and unmap it when freed "
                             "(MALLOC_MMAP_THRESHOLD_), so resident memory follows what is live")
    parser.add_argument("--out", default="bench/results/fsdp-memory.jsonl")
    parser.add_argument("extra", nargs="*", help="more gspo train overrides")
    args = parser.parse_args(argv)
    if args.worker:
        worker(Path(args.worker))
        return
    if args.count_layer:
        counted = count_layer_activations(QWEN3_30B_A3B)
        print(f"Qwen3-30B-A3B layer, bf16: {counted:,} bytes per token saved for the backward (autograd's hooks); "
              f"the formula's count {QWEN3_30B_A3B.layer_activation_bytes(2):,}")
        return
    if args.preset:
        for name, run in [("experiment=qwen3-moe-gsm8k (8 x 80 GB)", preset_run()),
                          ("the same with hardware.gather_for_rollout=true",
                           preset_run("hardware.gather_for_rollout=true"))]:
            print(f"== {name}: {QWEN3_30B_A3B.params / 1e9:.2f}B parameters")
            print_terms(formula(QWEN3_30B_A3B, run))
        return

    from gspo_cli.launch import write_resolved_config

    overrides = CPU_OVERRIDES + args.extra
    cfg = compose(overrides)
    shape, run = shape_of(cfg), run_of(cfg, args.prompt_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        cfg.cache_dir = str(Path(cfg.cache_dir).expanduser())
        write_resolved_config(cfg, run_dir)
        start = time.perf_counter()
        env = dict(os.environ, **(RETURN_FREED if args.return_freed else {}))
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={run.world}", "-m", "bench.fsdp_memory", "--worker", str(run_dir)],
                       check=True, env=env)
        wall = time.perf_counter() - start
        ranks = [json.loads((run_dir / f"memory-rank{r}.json").read_text()) for r in range(run.world)]
    terms = formula(shape, run)
    print(f"{shape.params / 1e6:.1f}M parameters (root {shape.root_params / 1e6:.1f}M, "
          f"layer {shape.layer_params / 1e6:.2f}M), {run}")
    record = {"date": time.strftime("%Y-%m-%d"), "commit": commit(), "overrides": overrides, "wall_s": round(wall, 1),
              "allocator": RETURN_FREED if args.return_freed else "glibc defaults (hardware.keep_freed_memory=false)",
              "params": shape.params, "run": dataclasses.asdict(run),
              "terms": {p: {k: round(v) for k, v in t.items()} for p, t in terms.items()}, "ranks": []}
    for rank in ranks:
        predicted = peaks(terms, rank["baseline"])
        measured = measured_phases(rank["events"])
        lines = [f"rank {rank['rank']}: process baseline {rank['baseline'] / GB:.3f} GB"]
        for phase in PHASES:
            if phase in measured:
                lines.append(f"  {phase:<14} measured {measured[phase] / GB:6.3f} GB, "
                             f"formula {predicted[phase] / GB:6.3f} GB ({measured[phase] / predicted[phase] - 1:+.0%})")
        peak, formula_peak = max(e["peak"] for e in rank["events"]), max(predicted.values())
        lines.append(f"  {'whole run':<14} measured {peak / GB:6.3f} GB, formula {formula_peak / GB:6.3f} GB "
                     f"({peak / formula_peak - 1:+.0%})")
        print("\n".join(lines))
        record["ranks"].append({**rank, "predicted": {k: round(v) for k, v in predicted.items()},
                                "measured": measured, "peak_measured": peak, "peak_predicted": round(formula_peak)})
    print_terms(terms, ranks[0]["baseline"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
