"""The sorted per-expert kernel (`gspo_cli.models.kernels.experts`) computes what transformers' experts compute."""

import json

import pytest
import torch
import torch.nn.functional as F

from gspo_cli.models.kernels import experts
from gspo_cli.models.loading import load_model
from gspo_cli.models.routing import is_moe


def reference_experts(x, gate_up, down, top_k_index, top_k_weights):
    """Token by token: sum over its k experts of weight · down_e(silu(gate_e x) · up_e x)."""
    width = down.shape[2]
    rows = []
    for token in range(x.shape[0]):
        total = torch.zeros(x.shape[1], dtype=x.dtype)
        for slot in range(top_k_index.shape[1]):
            e = int(top_k_index[token, slot])
            gate, up = (gate_up[e] @ x[token]).split(width)
            total = total + top_k_weights[token, slot] * (down[e] @ (F.silu(gate) * up))
        rows.append(total)
    return torch.stack(rows)


def test_kernel_matches_a_token_by_token_reference_with_an_idle_expert(tiny_model):
    model, _ = tiny_model
    module = model.model.layers[0].mlp.experts
    assert experts.supports(module)
    torch.manual_seed(0)
    x = torch.randn(6, module.hidden_dim, requires_grad=True)
    # Expert 3 of 4 gets no token; expert 0 gets most.
    top_k_index = torch.tensor([[0, 1], [1, 0], [2, 0], [0, 2], [1, 2], [0, 1]])
    top_k_weights = torch.rand(6, 2, requires_grad=True)
    out = experts.sorted_experts_forward(module, x, top_k_index, top_k_weights)
    weights = (module.gate_up_proj, module.down_proj)
    grads = torch.autograd.grad(out.square().sum(), (x, top_k_weights, *weights))

    ref = reference_experts(x, *weights, top_k_index, top_k_weights)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, top_k_weights, *weights))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert grads[2][3].abs().sum() == 0 and grads[3][3].abs().sum() == 0  # the idle expert


def test_model_logits_and_every_gradient_match_transformers_eager(tiny_model_dir):
    ids = torch.randint(3, 90, (5, 12), generator=torch.Generator().manual_seed(0))
    results = {}
    for name in ("eager", experts.NAME):
        model = load_model(tiny_model_dir, experts_implementation=name)
        assert model.config._experts_implementation == name
        logits = model(input_ids=ids).logits
        logits.logsumexp(-1).mean().backward()
        results[name] = (logits, {n: p.grad for n, p in model.named_parameters()})
    (logits_a, grads_a), (logits_b, grads_b) = results.values()
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_auto_picks_the_kernel_on_cpu_only_and_checkpoints_do_not_carry_it(tiny_model_dir, tmp_path):
    assert experts.choose("auto", "cpu") == experts.NAME
    assert experts.choose("auto", "cuda:0") is None  # transformers' grouped GEMM on GPUs
    assert experts.choose("eager", "cuda") == "eager"
    assert experts.choose("default", "cpu") is None
    model = load_model(tiny_model_dir)  # model.experts_implementation defaults to auto
    assert is_moe(model) and model.config._experts_implementation == experts.NAME
    model.save_pretrained(tmp_path)
    assert experts.NAME not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    # A plain transformers load of what the tool saved works without this module.
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._experts_implementation != experts.NAME


def test_autocast_falls_back_to_transformers_grouped_gemm(tiny_model_dir):
    model = load_model(tiny_model_dir)
    ids = torch.randint(3, 90, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("name", ["grouped_mm", "eager"])
def test_other_implementations_can_be_chosen(tiny_model_dir, name):
    assert load_model(tiny_model_dir, experts_implementation=name).config._experts_implementation == name


def test_sampling_path_computes_what_the_training_kernel_computes(tiny_model):
    """Without a graph (sampling) the experts run through `torch._grouped_mm` where torch has
    it: the numbers of the autograd kernel the trainer runs, so π_old taken from the sampler is
    the trainer's. Bit for bit on the CPUs measured, but `_grouped_mm` and the per-expert `mm`
    loop are two kernels, free to block their sums differently: compared to float rounding."""
    model, _ = tiny_model
    module = model.model.layers[0].mlp.experts
    torch.manual_seed(1)
    x = torch.randn(40, module.hidden_dim)
    top_k_index = torch.randint(0, 3, (40, 2))  # the last expert idle: an empty group
    top_k_weights = torch.rand(40, 2)
    with torch.enable_grad():
        trained = experts.sorted_experts_forward(module, x, top_k_index, top_k_weights)
    with torch.no_grad():
        sampled = experts.sorted_experts_forward(module, x, top_k_index, top_k_weights)
    assert trained.requires_grad and not sampled.requires_grad
    # Outputs are ~1e-3 here: an absolute slack in proportion, rounding is ~1e-7 of them.
    torch.testing.assert_close(sampled, trained.detach(), rtol=1e-6, atol=1e-6 * trained.abs().max().item())
