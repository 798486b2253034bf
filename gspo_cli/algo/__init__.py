"""The RL math as pure tensor functions: the policy losses and their registry (`losses`), one
aggregation for every normalisation (`aggregation`), group advantages (`advantages`), the KL
penalty (`kl`), the sampler/trainer gap and its correction (`rollout_correction`) and DAPO's
batch shaping (`batch_shaping`).

Imports nothing else from the package: every other layer may import it.
"""
