"""The fused CPU decode kernels give what the eager decoder gives, state included (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch

import models.fast_nemotron_h as fnh
from models.cpu_kernels import kernels
from models.fast_llama import fast_decoder
from models.mtp import add_mtp_heads
from models.policy import init_policy

pytestmark = pytest.mark.skipif(kernels() is None, reason="no C++ compiler: the fused kernels are not built")


@pytest.fixture(scope="module")
def policy():
    policy = init_policy("tiny-hybrid-moe", seed=0)
    add_mtp_heads(policy.model, seed=1)
    return policy


def _prefilled(fast, ids):
    state = fast.new_state(6, 64)
    for slot, n in [(1, 9), (4, 17), (5, 12)]:
        fast.extend(state, slot, ids[:n])
    return state


def _both(policy, run, monkeypatch):
    """run(fast, state) once with the fused kernels and once eager, from the same prefill."""
    ids = torch.randint(0, 500, (24,), generator=torch.Generator().manual_seed(0))
    fast = fast_decoder(policy.model)
    fused_state = _prefilled(fast, ids)
    fused = run(fast, fused_state)
    with monkeypatch.context() as m:
        m.setattr(fnh, "_fused_for", lambda x: None)
        eager_state = _prefilled(fast, ids)
        eager = run(fast, eager_state)
    return fused, eager, fused_state, eager_state


def _same_state(a, b):
    assert torch.equal(a.lengths, b.lengths)
    for name, t in a.tensors.items():
        length = int(a.lengths.max())
        x, y = (t[:, :length], b.tensors[name][:, :length]) if name.endswith((".k", ".v")) else (t, b.tensors[name])
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4), name


def test_decode_matches_eager_on_scattered_slots(policy, monkeypatch):
    slots = torch.tensor([4, 1, 5])  # not a contiguous run: the kernels index slots directly

    def run(fast, state):
        routing = []
        out = [fast.decode(state, slots, torch.tensor([7, 8, 9]), routing) for _ in range(3)]
        return torch.stack(out), torch.cat(routing)

    (fused, f_route), (eager, e_route), fs, es = _both(policy, run, monkeypatch)
    assert torch.allclose(fused, eager, atol=1e-5, rtol=1e-4)
    assert torch.equal(f_route.sort(-1).values, e_route.sort(-1).values)  # same experts chosen
    _same_state(fs, es)


def test_verify_and_rollback_match_eager(policy, monkeypatch):
    slots = torch.tensor([5, 1, 4])
    tokens = torch.tensor([[3, 4, 5], [6, 7, 8], [9, 10, 11]])

    def run(fast, state):
        logits, hidden, saved = fast.verify(state, slots, tokens)
        fast.rollback(state, slots, torch.tensor([1, 3, 2]), saved)  # one row keeps all 3
        return logits, hidden, fast.decode(state, slots, torch.tensor([1, 2, 3]))

    fused, eager, fs, es = _both(policy, run, monkeypatch)
    for a, b in zip(fused, eager, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    _same_state(fs, es)


def test_mtp_step_matches_the_head(policy):
    fast = fast_decoder(policy.model)
    gen = torch.Generator().manual_seed(1)
    embeds, hidden = torch.randn(5, 128, generator=gen), torch.randn(5, 128, generator=gen)
    with torch.no_grad():
        expected = policy.model.mtp(embeds, hidden)
    assert torch.allclose(fast.mtp_step(embeds, hidden), expected, atol=1e-5, rtol=1e-4)


def test_expert_weights_are_retransposed_after_an_in_place_update(policy, monkeypatch):
    fast = fast_decoder(policy.model)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(2))
    moe = policy.model.model.layers[1].mixer
    fast._moe(moe, x, None)  # caches the transposed expert weights
    saved = moe.experts.up_proj.detach().clone()
    try:
        with torch.no_grad():
            moe.experts.up_proj.mul_(1.5)  # what a weight sync's copy_ does: same storage
        fused = fast._moe(moe, x, None)
        with monkeypatch.context() as m:
            m.setattr(fnh, "_fused_for", lambda x: None)
            eager = fast._moe(moe, x, None)
    finally:
        with torch.no_grad():
            moe.experts.up_proj.copy_(saved)
    assert torch.allclose(fused, eager, atol=1e-5, rtol=1e-4)


def test_disabled_kernels_fall_back_to_eager(monkeypatch):
    monkeypatch.setenv("ESTUARY_CPU_KERNELS", "0")
    assert kernels() is None
    assert fnh._fused_for(torch.zeros(2, 2)) is None


def test_a_slot_outside_the_state_is_refused_not_written():
    k = kernels()
    state, history = torch.zeros(2, 4), torch.ones(1, 3, 4)
    with pytest.raises(RuntimeError, match="slot 5 is outside the state's 2 slots"):
        k.restore_rows(state, history, torch.tensor([5]), torch.tensor([1]))
    cache = torch.zeros(2, 8, 1, 4)
    q, kv = torch.ones(1, 1, 2, 4), torch.ones(1, 1, 1, 4)
    with pytest.raises(RuntimeError, match="slot -1 is outside"):
        k.attn_decode(q, kv, kv, cache, cache.clone(), torch.tensor([-1]), torch.tensor([0]), 1.0)
    assert not state.any() and not cache.any()


@pytest.mark.parametrize("rows", range(1, 9))
def test_small_linear_is_f_linear_for_one_to_eight_rows(rows):
    k = kernels()
    gen = torch.Generator().manual_seed(rows)
    # 1029 columns: a tail after the 8-wide vectors; 77 outputs: a tail after the row blocks
    for cols, outs in [(1029, 77), (128, 768), (5, 3)]:
        x, w, b = (torch.randn(rows, cols, generator=gen), torch.randn(outs, cols, generator=gen),
                   torch.randn(outs, generator=gen))
        assert torch.allclose(k.small_linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-5)
        batched = k.small_linear(x[None], w, None)  # leading dimensions kept, no bias
        assert batched.shape == (1, rows, outs)
        assert torch.allclose(batched[0], x @ w.T, atol=1e-4, rtol=1e-5)


def test_small_linear_refuses_more_than_eight_rows():
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        kernels().small_linear(torch.zeros(9, 4), torch.zeros(3, 4), None)


@pytest.mark.parametrize("tokens", [5, 12])  # up to 8 tokens of large experts go expert by expert
def test_routed_experts_match_torch_token_by_token_and_grouped(tokens):
    gen = torch.Generator().manual_seed(tokens)
    experts, latent, inner, top_k = 4, 256, 256, 2  # 256 x 256: large enough for the grouped path
    scores = torch.rand(tokens, experts, generator=gen)
    bias = torch.randn(experts, generator=gen) * 0.1
    x = torch.randn(tokens, latent, generator=gen)
    up_t = torch.randn(experts, latent, inner, generator=gen) / 16
    down_t = torch.randn(experts, inner, latent, generator=gen) / 16
    out, ids, weights = kernels().moe_experts(scores, bias, x, up_t, down_t, top_k, True, 1.0)
    chosen = (scores + bias).topk(top_k, dim=-1).indices
    assert torch.equal(ids, chosen)
    picked = scores.gather(1, chosen)
    assert torch.allclose(weights, picked / picked.sum(-1, keepdim=True), atol=1e-6)
    expected = torch.zeros_like(x)
    for t in range(tokens):
        for j in range(top_k):
            e = int(chosen[t, j])
            expected[t] += weights[t, j] * (torch.relu(x[t] @ up_t[e]) ** 2) @ down_t[e]
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)
