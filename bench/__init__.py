"""Throughput benchmark (`make bench`): this project's trainer against TRL's GRPOTrainer in GSPO mode.

`bench.run` is the entry point; each measured run executes in its own process (`bench.worker`)
so that its peak memory is its own. See README.md, "Throughput".
"""
