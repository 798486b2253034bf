"""What the model is asked and how answers are scored: tasks and their held-out split (`tasks`),
verifiable rewards (`rewards`), and reading local or hub data files (`files`).

Imports only `config` and `algo`; imported by `rollout`, `train` and the top level.
"""
