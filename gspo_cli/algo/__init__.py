"""The RL math as pure tensor functions: the policy losses and their registry (`losses`, with
GSPO's follow-ups in `followup_losses`, off-policy sequence masking in `off_policy_mask` and the
pieces they share in `loss_terms`), one aggregation for every normalisation (`aggregation`),
group advantages (`advantages`), the KL penalty (`kl`), the sampler/trainer gap and its
correction (`rollout_correction`) and DAPO's batch shaping (`batch_shaping`).

Imports nothing else from the package: every other layer may import it.
"""
