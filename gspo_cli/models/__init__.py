"""The policy model: loading with `from_pretrained` (`loading`), the models the tool builds itself
(`build`), cache directories (`storage`), MoE routing metrics and Routing Replay (`routing`), LoRA adapters (`lora`),
and the CPU-only kernels (`kernels/`).

Imports only `config`; imported by `rollout`, `train` and the top level.
"""
