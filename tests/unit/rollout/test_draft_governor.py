"""Drafting on or off by the active batch: fixed crossovers, and one measured as the engine runs."""

from __future__ import annotations

import pytest

from rollout.draft_governor import DraftGovernor, bucket


def test_buckets_are_powers_of_two():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 64)] == [1, 2, 4, 4, 8, 8, 16, 64]


def test_a_fixed_crossover_drafts_up_to_it_and_zero_always_drafts():
    fixed = DraftGovernor(max_batch=4)
    assert [fixed.draft(n) for n in (1, 4, 5, 64)] == [True, True, False, False]
    assert all(DraftGovernor(max_batch=0).draft(n) for n in (1, 64))
    with pytest.raises(ValueError, match="-1 \\(measured\\)"):
        DraftGovernor(max_batch=-2)


def test_the_measured_crossover_follows_the_cheaper_way_per_bucket_and_keeps_checking():
    governor = DraftGovernor(explore_every=4)
    assert governor.draft(1)  # nothing measured: drafting first ...
    governor.record(1, True, seconds=0.010, tokens=5)  # 2 ms a token
    assert not governor.draft(1)  # ... then plain steps
    governor.record(1, False, seconds=0.0021, tokens=1)  # 2.1 ms a token: drafting is cheaper at 1, by 5%
    for n, drafted, seconds in ((64, True, 0.40), (64, False, 0.128)):  # 64 sequences: drafting costs
        governor.record(n, drafted, seconds, tokens=64 * (2 if drafted else 1))
    choices = [governor.draft(1) for _ in range(8)]
    assert choices == [True, True, False, False, True, True, False, False]  # close: the other way 2 steps in 4
    assert not governor.draft(64) and governor.crossover() == 1
    for _ in range(20):  # drafting gets dearer at batch 1 (say the heads fell behind the policy): it follows
        governor.record(1, True, seconds=0.05, tokens=1)
    assert not governor.draft(1) and governor.crossover() == 0


def test_ways_far_apart_are_checked_less_often():
    """Checking costs the gap between the ways for two steps: at 1.6x, every 4th step of 4 would
    spend 30% more; the period stretches with the gap (6 units of 10% here: every 24th step)."""
    governor = DraftGovernor(explore_every=4)
    governor.record(8, True, seconds=0.016, tokens=10)  # 1.6 ms a token drafting
    governor.record(8, False, seconds=0.001, tokens=1)  # 1.0 ms plain: drafting costs 60% more
    choices = [governor.draft(8) for _ in range(48)]
    assert [i for i, c in enumerate(choices) if c] == [22, 23, 46, 47]
    governor.record(64, True, seconds=0.1, tokens=1)  # 100x apart: no more than MAX_STRETCH times less often
    governor.record(64, False, seconds=0.001, tokens=1)
    assert [i for i in range(64) if governor.draft(64)] == [30, 31, 62, 63]  # every 4 * 8 = 32nd
