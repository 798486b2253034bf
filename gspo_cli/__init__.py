"""gspo: reinforcement learning of language models with GSPO and the algorithms it is compared with.

Layers, each importing only from the layers below it (`tests/test_layout.py` checks this):

- top: `cli` (the `gspo` command), `launch` (torchrun), `evaluate` (the `gspo eval` job),
  `eval_task` (which task it scores each checkpoint on), `config` (the typed schema; it imports nothing from the package, so every layer may use it);
- `train/`: the loop and the named steps it calls, checkpoints, distributed set-up, guards;
- `report/`: metrics logs (jsonl, W&B, console), sweep reports, plots;
- `rollout/`: generation, scoring of responses, greedy evaluation, dynamic sampling;
- `models/`: building and loading models, MoE routing metrics and replay, CPU kernels;
- `data/`: tasks, rewards, reading data files;
- `algo/`: the RL math as pure tensor functions (losses, advantages, KL, corrections).
"""
