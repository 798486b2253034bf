"""The training loop (`loop`) and the named steps it calls (`steps`), with what a run needs around
them: checkpoints (`checkpoint`), torchrun/DDP/FSDP2 set-up (`distributed`), precision
(`precision`), numeric guards (`guards`), host tuning (`host`) and the supervised warm start
that stands in for pretraining (`warmstart`).

Imports every lower layer; imported only by the top level (`launch`, `cli`, `evaluate`).
"""
