"""Speculative acceptance is exact: emitted tokens follow the target distribution (chi-square)."""

from __future__ import annotations

import torch
from scipy.stats import chisquare

from rollout.speculative import speculative_accept

V, N = 5, 40_000


def _dist(gen, *shape):
    return torch.softmax(torch.randn(*shape, V, generator=gen) * 1.5, dim=-1)


def _joint_counts(p1, p2, p3, q1, q2, gen):
    """Run one speculative round with K=2 drafts, completing to two tokens like the next round would."""
    x1 = torch.multinomial(q1.expand(N, V), 1, generator=gen)[:, 0]
    x2 = torch.multinomial(q2[x1], 1, generator=gen)[:, 0]
    target = torch.stack([p1.expand(N, V), p2[x1], p3[x1, x2]], dim=1).log()
    draft = torch.stack([q1.expand(N, V), q2[x1]], dim=1).log()
    accepted, tokens, lps = speculative_accept(target, draft, torch.stack([x1, x2], 1), gen)
    t1 = tokens[:, 0]
    t2 = torch.where(accepted >= 1, tokens[:, 1],
                     torch.multinomial(p2[t1], 1, generator=gen)[:, 0])
    # log-probs come from the target distribution, never the draft
    assert torch.allclose(lps[:, 0], p1.log()[t1], atol=1e-6)
    counts = torch.bincount(t1 * V + t2, minlength=V * V).double()
    return counts, _expected(p1, p2, counts), accepted


def _expected(p1, p2, counts):
    joint = (p1[:, None] * p2).flatten().double()
    return joint / joint.sum() * counts.sum()


def test_emitted_pairs_follow_the_target():
    gen = torch.Generator().manual_seed(0)
    p1, q1 = _dist(gen), _dist(gen)
    p2, q2 = _dist(gen, V), _dist(gen, V)
    p3 = _dist(gen, V, V)
    counts, expected, accepted = _joint_counts(p1, p2, p3, q1, q2, gen)
    assert chisquare(counts, expected).pvalue > 1e-3
    assert 0 < accepted.float().mean() < 2  # some drafts accepted, some rejected


def test_identical_draft_is_always_accepted_and_bonus_follows_target():
    gen = torch.Generator().manual_seed(1)
    p1, p2, p3 = _dist(gen), _dist(gen, V), _dist(gen, V, V)
    counts, expected, accepted = _joint_counts(p1, p2, p3, p1, p2, gen)
    assert bool((accepted == 2).all())
    assert chisquare(counts, expected).pvalue > 1e-3


def test_a_wrong_acceptance_rule_would_be_caught():
    # Guard on the test itself: accepting every draft gives the draft's distribution, which the
    # chi-square test must reject.
    gen = torch.Generator().manual_seed(2)
    p1, q1 = _dist(gen), _dist(gen)
    p2, q2 = _dist(gen, V), _dist(gen, V)
    x1 = torch.multinomial(q1.expand(N, V), 1, generator=gen)[:, 0]
    x2 = torch.multinomial(q2[x1], 1, generator=gen)[:, 0]
    counts = torch.bincount(x1 * V + x2, minlength=V * V).double()
    assert chisquare(counts, _expected(p1, p2, counts)).pvalue < 1e-6
