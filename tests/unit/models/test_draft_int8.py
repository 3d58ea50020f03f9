"""int8 drafting: the kernel's sums, the head's closeness to the fp32 head, and rebuilds after updates."""

from __future__ import annotations

import pytest
import torch

from models.cpu_kernels import kernels
from models.draft_int8 import Int8DraftHead, _linear, _packed
from models.fast_nemotron_h import FastNemotronH
from models.mtp import add_mtp_heads
from models.policy import init_policy


@pytest.mark.parametrize("rows", [1, 3, 8, 11])
def test_the_int8_kernel_sums_the_dequantized_weights(rows):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(67, 45), torch.randn(67), torch.randn(rows, 45)  # odd sizes: the tails
    q, scale, b = _packed(weight, bias)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    expected = x @ (q.float() * scale[:, None]).T + bias
    assert kernels() is not None
    assert torch.allclose(_linear((q, scale, b), x), expected, atol=1e-4)
    assert (weight - q.float() * scale[:, None]).abs().max() <= scale.max() / 2 + 1e-6  # rounding, no more


@pytest.fixture(scope="module")
def policy():
    policy = init_policy("tiny-hybrid-moe", seed=0)
    add_mtp_heads(policy.model, seed=1)
    return policy


def _inputs(policy, rows=3):
    torch.manual_seed(2)
    embeds = policy.model.get_input_embeddings()(torch.randint(0, 700, (rows,)))
    return embeds, torch.randn(rows, policy.model.config.hidden_size)


def test_an_int8_draft_step_is_close_to_the_fp32_heads(policy):
    embeds, hidden = _inputs(policy)
    exact = FastNemotronH(policy.model).mtp_step(embeds, hidden)
    head = Int8DraftHead(policy.model)
    draft = head.step(embeds, hidden)
    assert (draft - exact).norm() / exact.norm() < 0.05
    with torch.no_grad():
        p = policy.model.lm_head(exact).softmax(-1)
    q = head.logits(draft).softmax(-1)
    assert float(0.5 * (p - q).abs().sum(-1).max()) < 0.05  # total variation: a small loss of acceptance


def test_the_copies_follow_new_weights_once_invalidated(policy):
    embeds, hidden = _inputs(policy, rows=1)
    head = Int8DraftHead(policy.model)
    before = head.step(embeds, hidden)
    eh = policy.model.mtp.layers[0].eh_proj.weight
    saved = eh.detach().clone()
    try:
        with torch.no_grad():
            eh.mul_(-1.0)
        assert torch.equal(head.step(embeds, hidden), before)  # still the old copies
        head.invalidate()
        assert not torch.allclose(head.step(embeds, hidden), before)
    finally:
        with torch.no_grad():
            eh.copy_(saved)


def test_int8_drafting_needs_heads():
    with pytest.raises(ValueError, match="MTP heads"):
        Int8DraftHead(init_policy("tiny-hybrid-moe").model)
