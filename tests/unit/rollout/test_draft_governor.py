"""How deep to draft by the active batch: fixed crossovers, and depths measured as the engine runs."""

from __future__ import annotations

import random

import pytest

from bench.governor_replay import replay
from rollout.draft_governor import DraftGovernor, bucket


def test_buckets_are_powers_of_two():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 64)] == [1, 2, 4, 4, 8, 8, 16, 64]


def test_a_fixed_crossover_drafts_full_depth_up_to_it_and_zero_always_drafts():
    fixed = DraftGovernor(max_batch=4, max_depth=2)
    assert [fixed.depth(n) for n in (1, 4, 5, 64)] == [2, 2, 0, 0]
    assert all(DraftGovernor(max_batch=0, max_depth=3).depth(n) == 3 for n in (1, 64))
    with pytest.raises(ValueError, match="-1 \\(measured\\)"):
        DraftGovernor(max_batch=-2)
    with pytest.raises(ValueError, match="max_depth=-1"):
        DraftGovernor(max_depth=-1)
    with pytest.raises(ValueError, match="must exceed 4"):  # two other depths, two steps each
        DraftGovernor(max_depth=2, explore_every=4)


def _warm(governor: DraftGovernor, active: int, ms_per_token: dict[int, float], tokens: dict[int, int]) -> list[int]:
    """Run a bucket's warm-up, each step costing what `ms_per_token` says; the depths it asked for."""
    asked = []
    while (k := bucket(active)) not in governor.chosen():
        d = governor.depth(active)
        asked.append(d)
        governor.record(active, d, seconds=ms_per_token[d] * tokens[d] / 1000, tokens=tokens[d])
    assert k in governor.chosen()
    return asked


def test_each_bucket_measures_every_depth_then_takes_the_cheapest_and_checks_the_others_in_turn():
    governor = DraftGovernor(max_depth=2, explore_every=8, warmup=2)
    per_token = {2: 1.0, 1: 1.2, 0: 2.0}  # batch 1: two drafts cheapest, one 20% dearer, none 2x
    assert _warm(governor, 1, per_token, {2: 3, 1: 2, 0: 1}) == [2, 2, 1, 1, 0, 0]  # deepest first
    _warm(governor, 3, {2: 1.5, 1: 1.1, 0: 1.2}, {2: 2, 1: 2, 0: 1})  # batch 3-4: one draft cheapest
    _warm(governor, 64, {2: 3.0, 1: 2.0, 0: 1.0}, {2: 2, 1: 2, 0: 1})  # batch 64: plain steps
    assert governor.chosen() == {1: 2, 4: 1, 64: 0} and governor.crossover() == 4
    choices = [governor.depth(1) for _ in range(240)]
    # none (a switch: 2 x 100% + 1 step, 30 units of 2 x 5%): every 240th step, its two ending the
    # period; one draft (2 x 20%, 4 units): every 32nd, on two steps that never meet those
    assert {i: d for i, d in enumerate(choices) if d != 2} == {
        i: 1 for i in range(240) if i % 32 in (28, 29)} | {238: 0, 239: 0}
    for _ in range(20):  # two drafts get dearer at batch 1 (say the heads fell behind the policy): it follows
        governor.record(1, 2, seconds=0.005, tokens=1)
    assert governor.chosen()[1] == 1


def test_a_depths_cost_is_its_seconds_over_its_tokens_not_the_mean_of_each_steps_ratio():
    """A drafting step emits 1 to k+1 tokens as drafts are accepted or not: the cost of a token is
    the time over the tokens, which averaging each step's own ratio overstates (2 ms here, not 1.5)."""
    governor = DraftGovernor(max_depth=2)
    for tokens in (3, 1, 3, 1):
        governor.record(1, 2, seconds=0.003, tokens=tokens)
    assert governor.cost(1, 2) == pytest.approx(0.0015)
    assert governor.cost(1, 1) == float("inf")  # not measured


def test_depths_far_apart_and_switches_are_checked_less_often():
    """A check's two steps cost twice the gap between the depths, and one step more where it
    switches drafting off or on (the switch off feeds the pending tokens): the period stretches by
    that cost in units of 2 x 5%, so a depth 5% dearer is checked every period, and plain steps 4%
    dearer (1.08 steps with the switch) every 11th. A check's second step is taken whatever its
    first step measured."""
    governor = DraftGovernor(max_depth=2, explore_every=8, warmup=1)
    for depth, ms in ((2, 1.0), (1, 1.05), (0, 1.04)):
        governor.record(1, depth, seconds=ms / 1000, tokens=1)
    choices = [governor.depth(1) for _ in range(96)]
    assert {i: d for i, d in enumerate(choices) if d != 2} == {i: 1 for i in range(96) if i % 8 in (4, 5)} | {86: 0, 87: 0}
    for depth, ms in ((2, 100.0), (1, 50.0), (0, 1.0)):  # 50-100x apart: no more than MAX_STRETCH times less often
        governor.record(64, depth, seconds=ms / 1000, tokens=1)
    assert {i: d for i in range(256) if (d := governor.depth(64))} == {252: 2, 253: 2, 254: 1, 255: 1}  # every 8 * 32
    assert [governor.depth(64) for _ in range(254)].count(1) == 0
    assert governor.depth(64) == 1  # a check's first step ...
    governor.record(64, 1, seconds=10.0, tokens=1)  # ... found one draft 10000x dearer
    assert governor.depth(64) == 1 and governor.depth(64) == 0  # its second step all the same, then back


def _noisy_steps(seed: int = 0, n: int = 400) -> dict:
    """Steps like the 100M policy's at batch 1 (session 44): a plain step 22 ms, one draft 29 ms
    and two 37 ms, each +-8%, drafts accepted with probability 0.85 each in turn. Per token: two
    drafts cheapest, one 16% dearer, none 51%."""
    rng = random.Random(seed)
    pool = {}
    for depth, ms in ((0, 22.0), (1, 29.0), (2, 37.0)):
        rows = []
        for _ in range(n):
            tokens = 1
            while tokens <= depth and rng.random() < 0.85:
                tokens += 1
            rows.append((ms / 1000 * rng.lognormvariate(0, 0.08), tokens))
        pool[(1, depth)] = rows
    return pool


def test_on_noisy_steps_the_governor_stays_within_a_few_percent_of_the_best_depth():
    """A drafting step emits 1 to k+1 tokens: fast averages (0.2, the first cut) let a bad streak
    of the cheapest depth hand the choice to another, whose frozen estimate then holds it."""
    pool = _noisy_steps()
    best = min(sum(s for s, _ in rows) / sum(t for _, t in rows) for rows in pool.values())

    def over_best(**setting) -> float:
        return sum(replay(pool, 1, DraftGovernor(max_depth=2, **setting), seed) for seed in range(10)) / 10 / best

    slow, fast = over_best(), over_best(smoothing=0.2, warmup=4)
    assert slow < 1.03 and fast > slow, (slow, fast)


def test_a_check_that_moves_its_period_waits_the_new_one():
    """One draft 30% dearer than two (2 x 30% = 6 units: every 48th step); its check finds it 37%
    dearer (7 units: 56). The next check comes 56 steps after this one, not at the next multiple of
    56 (8 steps on, which checked a depth that looked dearer sooner)."""
    governor = DraftGovernor(max_depth=2, explore_every=8, warmup=1)
    for depth, ms in ((2, 1.0), (1, 1.3), (0, 3.0)):
        governor.record(1, depth, seconds=ms / 1000, tokens=1)
    checks = []
    for n in range(160):
        d = governor.depth(1)
        if d == 1:
            checks.append(n)
            governor.record(1, 1, seconds=0.0014, tokens=1)  # its measurement goes in at once
    assert checks[:4] == [44, 45, 100, 101]


def test_the_cheapest_depths_own_drift_is_followed_within_a_replan():
    """Two drafts were cheapest; their cost rises past one draft's (say the heads fell behind):
    within REPLAN steps the governor takes one draft, though no check ran in between."""
    from rollout.draft_governor import REPLAN

    governor = DraftGovernor(max_depth=2, explore_every=64, warmup=1, smoothing=0.5)
    for depth, ms in ((2, 1.0), (1, 1.2), (0, 3.0)):
        governor.record(1, depth, seconds=ms / 1000, tokens=1)
    assert governor.depth(1) == 2
    for _ in range(4):
        governor.record(1, 2, seconds=0.002, tokens=1)
    assert [governor.depth(1) for _ in range(REPLAN)][-1] == 1
