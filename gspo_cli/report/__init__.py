"""What a run tells its user: metrics logs to jsonl, W&B and the console (`logs`), which held-out
problems each evaluation answered (`eval_records`), training curves (`plots`), and sweep reports
(`sweep`, `summary`) that state how sure they are (`stats`: the formulas; `uncertainty`: intervals
per run and group, paired comparisons with a baseline, the collapse verdict).

Imports only `config`; imported by `train` and the top level.
"""
