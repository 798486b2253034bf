"""What a run tells its user: metrics logs to jsonl, W&B and the console (`logs`), training
curves (`plots`), and sweep reports (`sweep`).

Imports only `config`; imported by `train` and the top level.
"""
