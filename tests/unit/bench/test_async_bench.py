"""bench.async_bench compares the RL stages only: time and steps count from the step-0 evaluation."""

from __future__ import annotations

import math

from bench.async_bench import steps_per_hour, time_to

# (seconds since the run started, version, eval reward per environment)
FIRST = [(35.0, 0, {"lc": 0.41}), (70.0, 10, {"lc": 0.53}), (89.0, 20, {"lc": 0.33})]   # computed its start eval
SECOND = [(11.0, 0, {"lc": 0.41}), (40.0, 10, {"lc": 0.38}), (63.0, 20, {"lc": 0.51})]  # reused it


def test_time_to_target_counts_from_the_step_zero_evaluation():
    assert time_to(FIRST, 0.48, "lc") == 35.0
    assert time_to(SECOND, 0.48, "lc") == 52.0  # not 63: the 11 s before RL are not RL's
    assert math.isinf(time_to(SECOND, 0.9, "lc"))


def test_steps_per_hour_cover_the_same_span():
    assert steps_per_hour(FIRST) == 20 / 54 * 3600
    assert steps_per_hour(SECOND) == 20 / 52 * 3600
