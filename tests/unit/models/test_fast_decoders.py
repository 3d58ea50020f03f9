"""The incremental decoders match transformers' full forward (fp32, 1e-4) in every mode."""

from __future__ import annotations

import pytest
import torch

from models.decode_state import ContextOverflow
from models.fast_llama import fast_decoder
from models.policy import init_policy
from models.presets import TINY


# The 100M preset runs the same code at other widths (16 attention heads, 64 Mamba heads): slow.
@pytest.fixture(scope="module", params=[*sorted(TINY), pytest.param("hybrid-moe-100m", marks=pytest.mark.slow)])
def setup(request):
    policy = init_policy(request.param, seed=0)
    ids = torch.randint(0, len(policy.tokenizer), (160,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = policy.model(ids[None]).logits[0].float()
    return policy, fast_decoder(policy.model), ids, reference


def test_prefill_then_token_by_token(setup):
    _, fast, ids, ref = setup
    state = fast.new_state(4, 256)
    out = [fast.extend(state, 2, ids[:100])]  # prefill crosses chunk boundaries (chunk 64)
    for t in range(100, 160):
        out.append(fast.decode(state, torch.tensor([2]), ids[t:t + 1]))
    assert torch.allclose(torch.cat(out), ref, atol=1e-4)


def test_extend_in_pieces_is_multi_turn_continuation(setup):
    _, fast, ids, ref = setup
    state = fast.new_state(2, 256)
    a = fast.extend(state, 0, ids[:37])
    b = fast.extend(state, 0, ids[37:160])
    assert torch.allclose(torch.cat([a, b]), ref, atol=1e-4)


def test_extend_of_the_last_token_alone_is_the_full_extends_last_row_and_leaves_the_same_state(setup):
    """The engine's prefill samples from the last position only: the head runs on it alone."""
    _, fast, ids, ref = setup
    state = fast.new_state(2, 256)
    for slot, last in ((0, False), (1, True)):
        out = fast.extend(state, slot, ids[:100], last=last)
        assert out.shape == ((1 if last else 100), ref.shape[-1])
        assert torch.allclose(out[-1], ref[99], atol=1e-4)
    tail = fast.decode(state, torch.tensor([0, 1]), torch.stack([ids[100], ids[100]]))
    assert torch.allclose(tail[0], ref[100], atol=1e-4) and torch.allclose(tail[1], ref[100], atol=1e-4)


def test_short_continuations_after_a_long_prefill(setup):
    """Environment replies of a few dozen tokens (NemotronH runs them through the decode kernels)."""
    _, fast, ids, ref = setup
    state = fast.new_state(2, 256)
    pieces = [fast.extend(state, 1, ids[a:b]) for a, b in ((0, 70), (70, 71), (71, 90), (90, 138), (138, 160))]
    assert torch.allclose(torch.cat(pieces), ref, atol=1e-4)


def test_batched_decode_with_different_lengths_and_forks(setup):
    _, fast, ids, ref = setup
    state = fast.new_state(5, 256)
    fast.extend(state, 0, ids[:50])
    fast.extend(state, 4, ids[:90])
    state.copy(0, [1, 3])  # a prompt forked into its samples
    out = fast.decode(state, torch.tensor([0, 4, 1, 3]), torch.stack([ids[50], ids[90], ids[50], ids[50]]))
    for row, pos in enumerate([50, 90, 50, 50]):
        assert torch.allclose(out[row], ref[pos], atol=1e-4)


def test_snapshot_restore_rolls_back(setup):
    _, fast, ids, ref = setup
    state = fast.new_state(1, 256)
    fast.extend(state, 0, ids[:80])
    slots = torch.tensor([0])
    saved = state.snapshot(slots)
    fast.decode(state, slots, ids[80:81] + 1)  # a token that gets rejected
    state.restore(slots, saved)
    out = fast.decode(state, slots, ids[80:81])
    assert torch.allclose(out[0], ref[80], atol=1e-4)


def test_overflow_is_an_error(setup):
    _, fast, ids, _ = setup
    state = fast.new_state(1, 16)
    with pytest.raises(ContextOverflow, match="max_len"):
        fast.extend(state, 0, ids[:17])
