"""A short chaos run (`bench/chaos.py`): a rollout worker, the learner and Redis each killed with
`kill -9` during a real asynchronous `estuary train`; the run's records show nothing lost and
nothing trained twice."""

from __future__ import annotations

import pytest

from bench.chaos import KINDS, report, run_chaos

# Small steps and frequent commits, so that a minute holds several of each. The untrained policy's
# groups mostly score all zero: without dynamic sampling they train too, so steps come quickly.
QUICK = ["learner.groups_per_step=2", "learner.checkpoint_every=2", "rollout.max_concurrent_episodes=16",
         "rollout.group_size=4", "stream.claim_idle_ms=5000", "learner.dynamic_sampling=false",
         "eval.instances=1"]


def _check(t, faults: int) -> None:
    assert len(t.faults) >= faults, t.errors
    assert not t.lost and not t.twice and not t.unknown
    assert t.produced > 0 and t.trained > 0 and t.final_step > 0
    assert t.produced == t.trained + sum(t.dropped.values()) + t.dead + t.left  # every group accounted for
    assert t.driver_agrees


@pytest.mark.slow  # the default suite kills each kind once in test_fault_tolerance.py
def test_three_kills_lose_nothing_and_train_nothing_twice(tmp_path):
    # The run ends two steps after the third fault; the time budget only bounds a slow machine.
    t = run_chaos(minutes=6, seed=0, min_gap=5, max_gap=8, overrides=QUICK, out_dir=tmp_path, max_faults=3)
    report(t, 6, 0)
    _check(t, 3)
    assert sorted(f.kind for f in t.faults) == sorted(KINDS)  # one of each: the kinds come in shuffled rounds
    assert t.redis_restarts == 1


@pytest.mark.slow
@pytest.mark.timeout(1500)  # ten minutes of faults, then the run's end and the records: past the suite's 480 s
def test_ten_minutes_of_chaos(tmp_path):
    t = run_chaos(minutes=10, seed=1, min_gap=20, max_gap=40, overrides=QUICK, out_dir=tmp_path)
    report(t, 10, 1)
    _check(t, 10)
