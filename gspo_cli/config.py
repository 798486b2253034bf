"""Typed configuration: the schema every YAML file in `conf/` is validated against.

Hydra merges the group files (`model/`, `task/`, `algo/`, `hardware/`, `logger/`) into
`TrainConfig`. Because the schema is a structured config, a misspelled key or a value of
the wrong type fails while composing, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


def on_cpu_by_default(setting: Optional[bool], device: str) -> bool:
    """A CPU-only tuning switch: its value when set, else on for CPU runs and off elsewhere."""
    return device.split(":")[0] == "cpu" if setting is None else setting


@dataclass
class TinyModelSpec:
    """Shape of a model the tool builds itself (used when `ModelConfig.build` is set)."""

    hidden_size: int = 64
    """Width of the residual stream."""
    num_hidden_layers: int = 4
    """Decoder layers."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention, as in Qwen3)."""
    head_dim: int = 16
    """Per-head width."""
    intermediate_size: int = 256
    """MLP width of the dense model (and of dense layers of the MoE)."""
    num_experts: int = 8
    """Experts per MoE layer; 0 builds the dense `Qwen3ForCausalLM`."""
    num_experts_per_tok: int = 2
    """Top-k routing."""
    moe_intermediate_size: int = 128
    """MLP width of each expert."""
    max_position_embeddings: int = 128
    """Longest sequence the rotary embedding is set up for."""
    vocab_size: int = 0
    """Pad the character tokenizer with reserved tokens up to this size; 0 keeps the ~100 characters."""


@dataclass
class WarmStartConfig:
    """Short supervised phase that stands in for pretraining when the model is built locally."""

    enabled: bool = False
    """Run the warm start (only meaningful for models the tool builds itself)."""
    target_accuracy: float = 0.55
    """Stop at the step whose greedy accuracy on a probe of training prompts (left out of the warm
    start's own training when there are enough) is nearest this."""
    tolerance: float = 0.02
    """A check whose probe accuracy is within this of the target ends the warm start at once."""
    max_steps: int = 3000
    """Upper bound on supervised steps."""
    check_every: int = 50
    """Measure the stopping accuracy every this many steps."""
    batch_size: int = 64
    """Sequences per supervised step."""
    lr: float = 3e-3
    """AdamW learning rate of the supervised phase."""
    seed: int = 0
    """Seeds the model's initialisation and this phase; independent of the RL seed, so
    runs that differ only in `seed` (or `algo`) start from the same base."""
    begin_from: Optional[dict[str, Any]] = None
    """A curriculum: task keys (and `max_new_tokens`) of an easier warm start of the same model,
    e.g. `{chain_length: 10, max_new_tokens: 136}`; that one is trained first (or reused from
    the cache) and this one continues from its weights with a fresh optimizer. A `begin_from` key
    inside names that stage's own first stage (short → medium → long)."""
    balance_coef: float = 0.0
    """Weight of transformers' own MoE load-balancing loss in the warm start's loss (Qwen3-MoE's
    `router_aux_loss_coef` with `output_router_logits`; Switch Transformer, eqs. 4–6), as
    pretrained MoEs are trained: it keeps expert load even and router logits close. 0: off (the
    plain cross-entropy); MoE models only."""
    balance_scope: str = "pooled"
    """Whose load `balance_coef` evens. `pooled`: transformers' loss, every layer's choices counted
    together (even overall, each layer free to favour its own experts); `layer`: the same loss on
    each layer's choices, mean over layers, as Megatron-LM adds one in every MoE layer's router
    (each layer's load even). Both are k when balanced, so a coefficient means the same in either."""


@dataclass
class LoraAdapterConfig:
    """LoRA adapters through `peft` (docs/lora.md): only the adapters train, the base model stays frozen."""

    rank: int = 0
    """r of every adapter; 0 turns LoRA off and trains every parameter (full fine-tuning)."""
    alpha: Optional[float] = None
    """Scale of the adapters' update is alpha / rank; null: 2 × rank (a scale of 2)."""
    dropout: float = 0.0
    """Dropout on the adapters' input; `peft` refuses it (ValueError) when `target_parameters` adapts any weight."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Linear modules (by name suffix) that get an adapter: by default every attention projection."""
    target_parameters: list[str] = field(default_factory=lambda: ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    """Parameters (by name suffix) that get an adapter in place of a module: the fused expert weights of
    an MoE (one rank-r adapter per expert); names the model lacks (a dense model) are left out."""
    train_router: bool = False
    """MoE: train the routers (`mlp.gate`) as well, as full copies next to the frozen originals (`peft`'s
    `modules_to_save`; the KL reference uses the originals). Off by default: only low-rank adapters train."""


@dataclass
class ModelConfig:
    """Which causal LM to train and how to load it."""

    name: str = "tiny-qwen3-moe"
    """Short name, used in run names and the warm-start cache key."""
    path: Optional[str] = None
    """Hugging Face hub id or local directory for `from_pretrained`; unset for built models."""
    build: Optional[TinyModelSpec] = None
    """Build a small random Qwen3(-MoE) with the project's own tokenizer instead of loading."""
    dtype: str = "float32"
    """Dtype of the parameters and of AdamW's state: float32 (master weights; compute in bf16
    with `hardware.precision=bf16`), or bfloat16/float16 for pure low-precision training."""
    trust_remote_code: bool = False
    """Passed to `from_pretrained` for checkpoints that ship their own modelling code."""
    experts_implementation: str = "auto"
    """How MoE experts run: `auto` (this tool's sorted per-expert kernel on CPU, transformers'
    choice elsewhere; docs/cpu-tuning.md), `default` (transformers' choice), `gspo_sorted`, or a transformers name:
    `grouped_mm`, `batched_mm`, `eager`."""
    fused_rms_norm: Optional[bool] = None
    """Run float32 RMSNorms (Qwen, Llama, Mistral) as one autograd node (`gspo_cli/models/kernels/rms_norm.py`):
    the same outputs bit for bit, gradients equal up to rounding, about half the time on CPU.
    null: on for CPU runs, off elsewhere (docs/cpu-tuning.md)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (transformers' own
    gradient checkpointing, non-reentrant): activation memory of one layer instead of all."""
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    """Supervised warm start before RL (the local stand-in for a pretrained base)."""
    lora: LoraAdapterConfig = field(default_factory=LoraAdapterConfig)
    """LoRA adapters (off unless `model.lora.rank` > 0); the warm start, when set, trains the full model first."""


@dataclass
class TaskConfig:
    """Prompts with a verifiable reward."""

    name: str = "arithmetic"
    """Task family; `arithmetic` and `arithmetic-chain` are generated in memory, every other task reads `path`."""
    reward: Any = "exact_match"
    """A name in `gspo_cli.data.rewards.REWARDS`, `{_target_: pkg.mod.fn}` for your own function,
    or `{name: weight, ...}` to sum several (README, "Tasks and rewards")."""
    max_operand: int = 99
    """Arithmetic: operands are drawn from [0, max_operand]."""
    operators: str = "+"
    """Arithmetic: operators to draw from, e.g. "+-"."""
    chain_length: int = 8
    """Arithmetic-chain: operations per problem; the worked solution is about 8 tokens per
    operation plus 7 (3 → ~30 tokens, 62 → ~500)."""
    chain_form: str = "listed"
    """Arithmetic-chain: `listed`, the prompt lists every operation ("37+5-3="); `repeated`, one
    operation applied chain_length times ("37+5x3="), lines numbered by a countdown, so each line
    follows from the one before: ~12 tokens per operation plus 8 (2 → ~31, 10 → ~122, 39 → ~493)."""
    num_problems: int = 10000
    """Arithmetic-chain: distinct problems generated (training and held-out together)."""
    num_eval: int = 256
    """Held-out prompts, never seen by training (unused with `eval_path` or `eval_split`)."""
    seed: int = 1234
    """Seed of the train/held-out split (fixed, so runs with different seeds share it)."""
    path: Optional[str] = None
    """File tasks: a JSONL/JSON file, a Parquet file, a `save_to_disk` directory, a data set
    repository on disk, or a Hugging Face hub id such as `openai/gsm8k` (`datasets.load_dataset`)."""
    config_name: Optional[str] = None
    """File tasks read with `load_dataset` (hub ids, repositories on disk): the configuration
    (subset) to load, e.g. `main` for openai/gsm8k; unset: the data set's default."""
    split: str = "train"
    """File tasks: the split to train on when `path` holds several (a saved `DatasetDict`, a hub data set)."""
    eval_path: Optional[str] = None
    """File tasks: a separate evaluation set; unset holds out `num_eval` prompts of `path`."""
    eval_split: Optional[str] = None
    """File tasks: evaluate on this split of `eval_path`, else of `path` (a `DatasetDict`, a hub data set)."""
    prompt_key: str = "prompt"
    """File tasks: the field holding the prompt."""
    answer_key: str = "answer"
    """File tasks: the field holding the reference answer."""
    answer_extract: str = "none"
    """How the reference is read from the answer field: none, hashes (after `####`), boxed (last `\\boxed{}`)."""
    template: str = "{prompt}"
    """Prompt template; `{prompt}` is replaced by the prompt field."""
    chat_template: bool = False
    """Wrap each prompt as a user message in the tokenizer's chat template (chat models)."""
    system_prompt: Optional[str] = None
    """System message placed before the prompt when `chat_template` is set."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables for the chat template, e.g. `{enable_thinking: false}` for Qwen3."""


@dataclass
class AlgoConfig:
    """The policy loss, its aggregation, the advantage estimator and the rollout-batch options."""

    name: str = "gspo"
    """Name in the config group (for run names and reports)."""
    loss: str = "gspo"
    """Key of the loss in `gspo_cli.losses.LOSSES`."""
    clip_low: float = 3e-4
    """Lower clip range: ratios below 1 - clip_low are clipped (gmpo: in log space)."""
    clip_high: float = 4e-4
    """Upper clip range: ratios above 1 + clip_high are clipped (gmpo: in log space)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments passed to the loss function (e.g. sapo's tau_pos, tau_neg)."""
    loss_agg: str = "seq-mean-token-mean"
    """token-mean, seq-mean-token-mean, seq-mean-token-sum or seq-mean-token-sum-norm."""
    adv_baseline: str = "group-mean"
    """group-mean (GRPO) or rloo (leave-one-out mean of the other responses)."""
    adv_scale: str = "group-std"
    """Divide advantages by the group-std, the batch-std, or none."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the initial policy: a frozen copy, or with LoRA the policy with its
    adapters switched off (no copy); 0 computes no reference."""
    kl_estimator: str = "k3"
    """Estimator of that KL: k1, k2 or k3."""
    old_logp: str = "auto"
    """π_old from a forward pass of the rollout policy (recompute), from the sampler (rollout),
    or auto: the sampler's numbers when they are the trainer's own (fp32, no correction), else recompute."""
    rollout_correction: str = "none"
    """Importance correction for the sampler/trainer gap (needs π_old recomputed): none, or
    tis-LEVEL (truncated: min(ρ, cap)) or mis-LEVEL (masked: ρ where cap_low ≤ ρ ≤ cap, else 0), with
    LEVEL token (ρ_t), seq (the product Π_t ρ_t) or geo (its geometric mean, length-normalised as GSPO's ratio)."""
    rollout_correction_cap: float = 2.0
    """C of `rollout_correction`, its upper bound (geo modes want caps near 1, e.g. 1.001)."""
    rollout_correction_cap_low: Optional[float] = None
    """Lower bound of the masked modes (mis-*); null: 1/rollout_correction_cap. The truncated modes have none."""
    tis_cap: Optional[float] = None
    """Shorthand kept from earlier versions: `tis_cap=C` is rollout_correction=tis-token with cap C."""
    mask_truncated: bool = False
    """Leave responses cut off at `trainer.max_new_tokens` out of the loss (DAPO's overlong filtering)."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal and refill the batch from new prompts (DAPO)."""
    max_refill_rounds: int = 4
    """Extra rollout batches dynamic sampling may draw per step before it gives up, with a warning."""
    overlong_buffer: float = 0.0
    """DAPO's soft overlong penalty: its interval as a share of max_new_tokens; 0 turns it off."""
    overlong_penalty: float = 1.0
    """Penalty added to the reward (negated) of a response that reaches max_new_tokens."""
    routing_replay: bool = False
    """MoE only: compute π_θ with the experts π_old chose in every layer (GRPO's Routing Replay)."""
    routing_metrics: Optional[bool] = None
    """MoE only: keep the experts π_old and the update's passes chose and log how many changed
    (`routing/changed_fraction`); off, routes are captured only for Routing Replay and the
    volatility probe. null: on for MoE models (routes cost 1 byte per token, layer and top-k slot)."""
    routing_volatility: Optional[bool] = None
    """MoE only: after each mini-batch's optimizer step, re-run some of its sequences (no gradient)
    and log the share of their experts that changed (`routing/volatility`, GSPO paper §5.3).
    null: on for MoE models (docs/metrics.md states its cost)."""
    routing_volatility_rows: int = 16
    """Sequences of each mini-batch re-run for `routing_volatility`, across all ranks (each rank
    its first ones, its share rounded up); 0: all of them."""


@dataclass
class TrainerConfig:
    """Rollout sizes, optimisation and the schedule of evaluation and logging."""

    max_steps: int = 80
    """RL steps; one step is one rollout batch with all its mini-batch updates."""
    prompts_per_step: int = 32
    """Prompts in a rollout batch."""
    group_size: int = 8
    """G: responses sampled per prompt."""
    num_minibatches: int = 4
    """Mini-batches per pass over the rollout batch, one optimizer step each (the paper's protocol uses 4)."""
    ppo_epochs: int = 1
    """Passes over the rollout batch, reshuffled after the first (TRL: `num_iterations`, verl:
    `ppo_epochs`); every pass divides by the same π_old. The paper's protocol uses 1."""
    staleness: int = 0
    """k: step t trains on the rollout the policy of step t − k sampled, as a trainer k steps behind
    its sampler would (AReaL's max_head_offpolicyness, prime-rl's max_async_level); steps t ≤ k on
    batches of the initial policy. A research knob for off-policy lag, not a speed-up: a FIFO of k
    scored batches, carried by checkpoints. `algo.old_logp` picks the ratio's denominator: rollout,
    the behaviour policy that sampled; recompute, the proximal one at the update, corrected by
    `algo.rollout_correction` (decoupled PPO). 0: on-policy (docs/algorithms.md)."""
    micro_batch_size: int = 0
    """Sequences per forward/backward pass inside a mini-batch, gradients accumulated; the loss
    and gradient equal one pass over the mini-batch. Also the batch of the π_old and reference
    passes. 0: the whole mini-batch at once."""
    micro_batch_tokens: int = 0
    """Padded tokens per forward/backward pass (verl's dynamic batch size): a mini-batch's rows are
    sorted by length and packed into passes of at most this many tokens (and `micro_batch_size`
    rows, if set), so a long-tailed batch costs its tokens, not rows × its longest response; the
    loss and gradient equal one pass. Also used by the π_old, reference and probe passes. 0: off."""
    logprob_chunk_tokens: int = 512
    """Response tokens (rows × positions) whose float32 logits exist at once when log-probabilities
    are computed (recomputed in the backward pass; 512 tokens of Qwen3's vocabulary: 311 MB); 0: all."""
    rollout_batch_size: int = 0
    """Sequences generated at a time (the KV cache is sized for this many); 0: the whole batch."""
    rollout_engine: str = "builtin"
    """What samples rollouts and the in-loop evaluation: `builtin` (this project's sampler) or
    `continuous` (transformers' continuous batching; `gspo_cli/rollout/engines.py`, docs/performance.md)."""
    rollout_engine_options: dict[str, Any] = field(default_factory=dict)
    """Extra `transformers.ContinuousBatchingConfig` fields for `continuous` (e.g. max_batch_tokens)."""
    eval_batch_size: int = 256
    """Sequences decoded at a time by the in-loop greedy evaluation."""
    max_new_tokens: int = 8
    """Longest response."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (log-probabilities use the same)."""
    top_p: float = 1.0
    """Nucleus sampling of rollouts: draw from the most likely tokens holding this much probability
    (1.0: off). The sampler's log-probabilities are then those of the truncated distribution,
    the trainer's of the full one: the rollout is off-policy (docs/algorithms.md)."""
    top_k: int = 0
    """Draw rollouts from the k most likely tokens only (0: off); off-policy like `top_p`."""
    stop_strings: list[str] = field(default_factory=list)
    """End a response once its text contains one of these (kept in the response), besides the
    model's stop tokens (generation_config.json's `eos_token_id` and the tokenizer's eos)."""
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimizer steps."""
    eval_every: int = 10
    """Evaluate at step 0, every this many steps, and at the end."""
    eval_samples_logged: int = 8
    """Completions logged as a table at each evaluation."""
    save_final: bool = True
    """Write the trained model to `checkpoints/final/` in the run directory."""
    save_every: int = 0
    """Save a resumable checkpoint every this many steps (0: only on SIGTERM/SIGINT and faults)."""
    keep_last: int = 2
    """Resumable checkpoints kept; older ones are deleted."""
    max_bad_steps: int = 3
    """Stop after this many steps in a row whose every update was skipped as non-finite."""
    no_signal_warn_steps: int = 5
    """Warn once when every group's rewards were equal (no gradient) this many steps in a row; 0: off."""


@dataclass
class HardwareConfig:
    """Where the run executes."""

    device: str = "cpu"
    """torch device: cpu or cuda."""
    precision: str = "fp32"
    """Compute precision: fp32, or bf16 (autocast in one process, FSDP2's mixed precision over
    float32 shards with several; parameters and optimizer state stay in `model.dtype`)."""
    nproc_per_node: int = 1
    """Processes per node (torchrun)."""
    nnodes: int = 1
    """Nodes (torchrun)."""
    num_threads: int = 0
    """CPU threads for torch (per process); 0 keeps torch's default (one per physical core)."""
    keep_freed_memory: Optional[bool] = None
    """Keep freed host memory for reuse instead of unmapping large blocks at every free
    (glibc `mallopt`; no effect elsewhere): no page faults in steady state (`gspo_cli/train/host.py`).
    null: on for CPU runs of responses up to 256 tokens (`max_new_tokens`), off elsewhere: on a GPU it would
    keep a loading process's peak host memory mapped for the whole run, and with long responses
    the never-trimmed heap keeps a high-water mark far above what is live (docs/cpu-tuning.md)."""
    fused_adamw: bool = True
    """AdamW's fused kernel (on CPU 5x faster than the foreach one for the same result up to rounding)."""
    strategy: str = "ddp"
    """Data parallelism with several processes: ddp, or fsdp (FSDP2 `fully_shard`)."""
    gather_for_rollout: bool = True
    """FSDP2: all-gather the parameters once per rollout and generate on the full model (each
    rank holds it while sampling), instead of gathering every layer at every decoded token."""
    load_from_rank0: bool = True
    """FSDP2: rank 0 alone reads the checkpoint; the other ranks build the model on the meta device
    and receive their shards by broadcast (the KL reference too), so no rank but rank 0 ever holds a
    full copy. false: every rank loads the whole model, then shards it. DDP keeps a full replica per rank."""
    fsdp_unsharded_accumulation: bool = False
    """FSDP2 with micro-batches: keep their gradients unsharded (a full fp32 gradient per rank) and
    reduce-scatter once per mini-batch. false: reduce-scatter after every micro-batch, so a rank
    holds only its shard's gradient (what a model that needs FSDP needs). DDP always all-reduces
    once per mini-batch (it keeps a full replica anyway)."""
    rdzv_endpoint: Optional[str] = None
    """host:port of torchrun's c10d rendezvous for several nodes; unset on one node."""
    rdzv_id: str = "gspo"
    """Job id shared by the nodes of one run (torchrun --rdzv_id)."""


@dataclass
class LoggerConfig:
    """Where metrics go besides `metrics.jsonl` and the console."""

    wandb: bool = True
    """Log to Weights & Biases."""
    project: str = "gspo"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user); unset uses the default."""
    group: Optional[str] = None
    """W&B group (sweeps put their runs in one group)."""
    mode: Optional[str] = None
    """online, offline or disabled; unset means offline unless WANDB_MODE is set or you are logged in."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    console_every: int = 5
    """When stdout is not a terminal, print a plain line every this many steps."""


@dataclass
class TrainConfig:
    """Root of the `gspo train` configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    """Seeds Python, NumPy and torch (sampling, initialisation, data order)."""
    cache_dir: str = "~/.cache/gspo"
    """Where built models and warm starts are cached between runs."""
    resume: Optional[str] = None
    """`auto`: continue from the latest complete checkpoint in the run directory (if any)."""
    run_name: Optional[str] = None
    """Name of the run on W&B; defaults to `<algo>-<model>-s<seed>`."""


def register_configs() -> None:
    """Register the schema so that `conf/train.yaml` can extend it (`- train_schema`)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)  # `conf/eval.yaml`


@dataclass
class EvalSamplingConfig:
    """How `gspo eval` samples and scores: greedy once, then n samples per problem."""

    k: int = 8
    """k of mean@k, pass@k and maj@k."""
    n: Optional[int] = None
    """Samples drawn per problem (n ≥ k); more lowers the variance of pass@k; unset means k."""
    temperature: float = 1.0
    """Sampling temperature of the n samples (greedy accuracy is always at temperature 0)."""
    max_new_tokens: int = 8
    """Longest response; a `gspo train` run's checkpoint uses the run's `trainer.max_new_tokens` unless this
    is set on the command line (the default 8 is the training default)."""
    stop_strings: list[str] = field(default_factory=list)
    """End a response once its text contains one of these, as `trainer.stop_strings` does in training; a run's
    checkpoint uses the run's `trainer.stop_strings` unless this is set on the command line."""
    batch_size: int = 512
    rollout_engine: str = "builtin"
    """What decodes: `builtin` or `continuous` (transformers' continuous batching), as `trainer.rollout_engine`."""
    """Sequences generated per forward batch."""
    dtype: str = "float32"
    """Parameter dtype when loading: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Passed to `from_pretrained` for checkpoints that ship their own modelling code."""
    samples_logged: int = 8
    """Example completions per checkpoint written to samples.jsonl and W&B."""


@dataclass
class EvalConfig:
    """Root of the `gspo eval` configuration."""

    checkpoint: Any = "???"
    """A Hugging Face causal-LM directory or hub id, a `gspo train` run directory, or a list `[a,b]`."""
    eval: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    """The task when the checkpoints are not `gspo train` runs; a run's own task otherwise, with what the
    command line sets on top (`gspo_cli/eval_task.py`)."""
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    """Seeds the sampling."""
