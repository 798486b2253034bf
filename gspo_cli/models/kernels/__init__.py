"""Kernels that make the CPU path fast: MoE experts sorted by expert (`experts`) and RMSNorm as
one autograd node (`rms_norm`). Both are switched on by `model.experts_implementation` and
`model.fused_rms_norm`, by default on CPU runs only; GPU runs use transformers' own code.
"""
