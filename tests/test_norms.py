"""RMSNorm as one autograd node: same outputs bit for bit, gradients equal up to rounding."""

import pytest
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

from gspo_cli.models.kernels.rms_norm import _RMSNorm, fuse_rms_norms


@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 4, 8)])
def test_matches_the_transformers_norm_forward_bitwise_and_backward_to_rounding(shape):
    torch.manual_seed(0)
    reference, fused = Qwen3MoeRMSNorm(shape[-1], eps=1e-6), Qwen3MoeRMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        reference.weight.copy_(torch.randn(shape[-1]))
        fused.weight.copy_(reference.weight)
    assert fuse_rms_norms(fused) == 1
    x = torch.randn(*shape, dtype=torch.float64).float().requires_grad_()
    x_copy = x.detach().clone().requires_grad_()
    grad = torch.randn(*shape)
    out_ref, out = reference(x), fused(x_copy)
    # Exact by construction: the fused forward runs transformers' four operations, in its order,
    # on the same tensor, so the same kernels reduce in the same order on any machine.
    assert torch.equal(out, out_ref)
    out_ref.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(x_copy.grad, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-6)


def test_backward_is_the_derivative_of_the_forward():
    torch.manual_seed(1)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: _RMSNorm.apply(a, w, 1e-6), (x, weight))


def test_other_dtypes_keep_the_original_forward():
    norm = Qwen3MoeRMSNorm(8)
    fuse_rms_norms(norm)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert norm(x).dtype == Qwen3MoeRMSNorm(8)(x).dtype
    assert torch.equal(norm(x), Qwen3MoeRMSNorm(8)(x))  # exact: it is the very same forward


def test_a_loaded_model_with_fused_norms_computes_the_same_logits(tiny_model_dir):
    from gspo_cli.models.loading import load_model

    plain, fused = load_model(tiny_model_dir, fused_rms_norm=False), load_model(tiny_model_dir, fused_rms_norm=True)
    num_norms = sum(type(m).__name__ in ("Qwen3MoeRMSNorm", "Qwen3RMSNorm") for m in fused.modules())
    assert num_norms > 0 and fuse_rms_norms(fused) == num_norms  # all of them, and idempotent
    ids = torch.randint(0, fused.config.vocab_size, (3, 9))
    logits = fused(input_ids=ids).logits
    # Every norm fused and none broken; the bitwise claim is the single norm's, above.
    torch.testing.assert_close(logits, plain(input_ids=ids).logits, rtol=1e-6, atol=1e-7)  # logits ~0.1
    logits.sum().backward()
    assert all(p.grad is not None for name, p in fused.named_parameters() if "norm" in name)
