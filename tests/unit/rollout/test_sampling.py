"""Sampling maths against hand-computed distributions."""

from __future__ import annotations

import math

import pytest
import torch

from rollout.sampling import processed_logprobs, sample


def _lp(logits, temperature=1.0, top_k=0, top_p=1.0):
    logits = torch.tensor([logits], dtype=torch.float32)
    return processed_logprobs(logits, torch.tensor([temperature]), torch.tensor([top_k]),
                              torch.tensor([top_p]))[0]


def test_temperature_scales_logits():
    lp = _lp([0.0, math.log(3.0)], temperature=1.0)
    assert lp.exp().tolist() == pytest.approx([0.25, 0.75])
    lp = _lp([0.0, math.log(3.0)], temperature=0.5)  # 1 : 9
    assert lp.exp().tolist() == pytest.approx([0.1, 0.9])


def test_top_k_renormalises():
    probs = _lp([math.log(p) for p in (0.5, 0.3, 0.2)], top_k=2).exp()
    assert probs.tolist() == pytest.approx([0.625, 0.375, 0.0])


def test_top_p_keeps_the_token_that_crosses_p():
    # sorted masses 0.5, 0.3, 0.2: p=0.6 keeps 0.5 and 0.3 (0.5 < 0.6), drops 0.2
    probs = _lp([math.log(p) for p in (0.2, 0.5, 0.3)], top_p=0.6).exp()
    assert probs.tolist() == pytest.approx([0.0, 0.625, 0.375])
    probs = _lp([math.log(p) for p in (0.2, 0.5, 0.3)], top_p=0.5).exp()
    assert probs.tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_rows_use_their_own_settings():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]))
    lp = processed_logprobs(logits, torch.tensor([1.0, 1.0]), torch.tensor([1, 0]), torch.tensor([1.0, 1.0]))
    assert lp[0].exp().tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert lp[1].exp().tolist() == pytest.approx([0.5, 0.3, 0.2])


def test_sample_returns_log_prob_of_drawn_token_and_matches_frequencies():
    lp = _lp([math.log(p) for p in (0.1, 0.6, 0.3)]).repeat(20000, 1)
    tokens, token_lp = sample(lp, torch.Generator().manual_seed(0))
    assert torch.allclose(token_lp, lp[0][tokens])
    freq = torch.bincount(tokens, minlength=3).float() / len(tokens)
    assert freq.tolist() == pytest.approx([0.1, 0.6, 0.3], abs=0.015)
