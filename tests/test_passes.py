"""The trainer's passes (`gspo_cli/train/passes.py`): rows packed by a token budget, each pass cut
to the columns its rows use, and the same numbers as a pass over the whole padded batch."""

import pytest
import torch
from conftest import TEST_SPEC

from gspo_cli.models.routing import MoERouting, routes_by_sequence
from gspo_cli.rollout.generate import generate_rollout
from gspo_cli.rollout.scoring import response_logprobs
from gspo_cli.train.passes import MicroBatch, pack_rows, plan_micro_batches, score_rows, split_to_count, window


def test_rows_are_packed_longest_first_under_the_token_budget():
    # Rows (prompt, response): 0 (2, 10), 1 (2, 1), 2 (2, 1), 3 (2, 8). Sorted by length: 0, 3, 1, 2.
    # Budget 24: [0] (1 × 12); + row 3: 2 × (2 + 10) = 24 fits; + row 1: 3 × 12 = 36 does not,
    # a new pass [1] (3); + row 2: 2 × (2 + 1) = 6 fits.
    prompts, responses = [2, 2, 2, 2], [10, 1, 1, 8]
    assert pack_rows(prompts, responses, max_rows=0, max_tokens=24) == [[0, 3], [1, 2]]
    assert pack_rows(prompts, responses, max_rows=1, max_tokens=24) == [[0], [3], [1], [2]]  # both limits
    # A row longer than the budget runs alone (it cannot be cut).
    assert pack_rows([2, 2], [30, 1], max_rows=0, max_tokens=10) == [[0], [1]]
    # No budget: consecutive rows, in their order, `max_rows` at a time (0: one pass).
    assert pack_rows(prompts, responses, max_rows=3, max_tokens=0) == [[0, 1, 2], [3]]
    assert pack_rows(prompts, responses, max_rows=0, max_tokens=0) == [[0, 1, 2, 3]]


def test_passes_are_split_until_every_rank_runs_as_many():
    # Costs: [0, 3] 2 × 12 = 24, [1, 2] 2 × 3 = 6: the first is split.
    prompts, responses = [2, 2, 2, 2], [10, 1, 1, 8]
    assert split_to_count([[0, 3], [1, 2]], 3, prompts, responses) == [[0], [3], [1, 2]]
    assert split_to_count([[0, 3], [1, 2]], 4, prompts, responses) == [[0], [3], [1], [2]]
    with pytest.raises(ValueError, match="4 rows in 5 passes"):
        split_to_count([[0, 3], [1, 2]], 5, prompts, responses)


def test_window_holds_every_real_token_of_the_rows():
    # [prompt (left pad) | response (right pad)], P = 3, T = 3.
    mask = torch.tensor([[0, 1, 1, 1, 0, 0],
                         [0, 0, 1, 1, 1, 0]])
    assert window(mask, 3) == (1, 5)
    assert window(mask[:1], 3) == (1, 4)  # at least one response column
    assert window(torch.zeros(1, 6), 3) == (2, 4)


@pytest.fixture
def padded_rollout(tiny_model):
    """Prompts of 3 to 7 characters, responses cut to 1-6 tokens: much padding on both sides."""
    model, tokenizer = tiny_model
    prompts = ["1+2=", "345+678=", "9*9=", "12+3=", "8-1=", "100+20="]
    rollout = generate_rollout(model, tokenizer, prompts, 6, 1.0, torch.Generator().manual_seed(0))
    T = rollout.response_mask.shape[1]
    lengths = torch.tensor([1, 6, 2, 4, 3, 5]).clamp(max=T)
    response_mask = (torch.arange(T)[None] < lengths[:, None]).float()
    attention_mask = rollout.attention_mask.clone()
    attention_mask[:, -T:] = response_mask.long()
    return model, rollout._replace(attention_mask=attention_mask, response_mask=response_mask)


def test_a_pass_on_its_window_gives_the_full_width_numbers(padded_rollout):
    """Rows packed by a budget of 30 tokens, each pass cut to its window: the same log-probabilities
    and gradient as one pass over the padded batch, and the experts of every real token in the
    batch's layout."""
    model, rollout = padded_rollout
    T, rows = rollout.response_mask.shape[1], torch.arange(6)
    routing = MoERouting(model)
    micros = plan_micro_batches(rollout, rows, max_rows=0, max_tokens=30)
    assert len(micros) > 1 and any(m.stop - m.start < rollout.input_ids.shape[1] for m in micros)  # cut
    assert sorted(torch.cat([m.rows for m in micros]).tolist()) == list(range(6))
    logp, routes = torch.zeros(6, T), [torch.zeros(6, rollout.input_ids.shape[1], 2, dtype=torch.uint8)] * 2
    routes = [r.clone() for r in routes]
    for micro in micros:
        part, part_routes = score_rows(model, rollout, micro, 0.7, 0, routing)
        logp[micro.rows] = part.detach()
        (part * rollout.response_mask[micro.rows]).sum().backward()  # gradients add up over the passes
        for layer, value in zip(routes, part_routes):
            layer[micro.rows] = value
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with routing.capture() as captured:
        whole = response_logprobs(model, rollout.input_ids, rollout.attention_mask, T, 0.7)
    (whole * rollout.response_mask).sum().backward()
    real = rollout.response_mask.bool()
    torch.testing.assert_close(logp[real], whole.detach()[real], rtol=0, atol=1e-5)
    P = rollout.input_ids.shape[1] - T
    assert all((logp[m.rows, m.stop - P:] == 0).all() for m in micros)  # columns past a pass's window
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    tokens = rollout.attention_mask.bool()
    for layer, full in zip(routes, routes_by_sequence(list(captured), 6)):
        assert layer.dtype == torch.uint8  # TEST_SPEC has 4 experts: one byte holds an expert index
        assert torch.equal(layer[tokens].long().sort(-1).values, full[tokens].long().sort(-1).values)
    assert TEST_SPEC.num_experts <= 256


def test_one_micro_batch_per_row_chunk_without_a_budget(padded_rollout):
    _, rollout = padded_rollout
    micros = plan_micro_batches(rollout, torch.tensor([5, 0, 3, 1]), max_rows=3, max_tokens=0)
    assert [m.rows.tolist() for m in micros] == [[5, 0, 3], [1]]  # in the given order
    assert all(isinstance(m, MicroBatch) for m in micros)
    assert plan_micro_batches(rollout, torch.tensor([], dtype=torch.long), 3, 0) == []
