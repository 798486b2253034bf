"""Responses and their log-probabilities: sampling with a KV cache (`generate`), the trainer's
scoring of responses (`scoring`), greedy evaluation (`evaluation`), and DAPO's dynamic
sampling, which draws again until groups carry signal (`refill`).

Imports `models`, `data` and `algo`; imported by `train` and the top level.
"""
