"""Evaluation maths against hand-computed values: pass@k, standard errors, per-instance summaries."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from estuary.eval_stats import mean_and_se, pass_at_k, plus_minus, rarely_right, summarise


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # only one wrong sample: every pair holds a correct one
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)  # large n: exact integers, no overflow
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_pass_at_k_is_the_chance_a_random_k_subset_holds_a_correct_sample():
    for n, c, k in [(5, 2, 3), (6, 1, 2), (4, 2, 4)]:
        flags = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(flags, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_mean_and_standard_error_hand_values():
    mean, se = mean_and_se([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5 and se == pytest.approx(math.sqrt(1 / 3) / 2)  # sd (ddof 1) = sqrt(1/3), /sqrt(4)
    mean, se = mean_and_se([2.0, 4.0])
    assert mean == 3.0 and se == pytest.approx(1.0)  # sd sqrt(2), / sqrt(2)
    assert math.isnan(mean_and_se([0.7])[1])
    assert plus_minus(0.4213, 0.0312) == "0.42±0.03" and plus_minus(0.5, float("nan")) == "0.50"


def test_summarise_takes_errors_across_instances_and_counts_exact_correctness():
    rewards = np.array([[1.0, 0.0], [1.0, 1.0], [0.5, 0.0]])  # (I=3, n=2)
    correct = rewards >= 1.0
    out = summarise(rewards, correct, k=2)
    assert out["instances"] == 3 and out["samples"] == 6
    assert out["reward"] == pytest.approx(7 / 12)  # per-instance means 0.5, 1, 0.25
    # sd of the per-instance means sqrt(21)/12, over sqrt(3) (over all 6 samples it would be 0.2007)
    assert out["reward_se"] == pytest.approx(math.sqrt(7) / 12)
    assert out["pass_at_1"] == pytest.approx(0.5)  # per instance 1/2, 1, 0: partial credit is not a pass
    assert out["pass_at_1_se"] == pytest.approx(0.5 / math.sqrt(3))  # sd of (0.5, 1, 0) is 0.5
    assert out["pass_at_2"] == pytest.approx(2 / 3)  # per instance 1, 1, 0
    assert out["pass_at_2_se"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))
    assert "pass_at_1" in summarise(rewards, correct, k=1) and "pass_at_2" not in summarise(rewards, correct, k=1)


def test_the_end_of_run_comparison_shows_each_change_in_standard_errors():
    from estuary.eval_stats import comparison

    def r(p, se, reward=None):
        return {"pass_at_1": p, "pass_at_1_se": se, "reward": p if reward is None else reward, "reward_se": se}

    start = {"code": r(0.49, 0.03), "code:budget8": r(0.50, 0.03), "math": r(0.04, 0.01, 0.13)}
    end = {"code": r(0.61, 0.03), "code:budget8": r(0.64, 0.03), "math": r(0.04, 0.01, 0.12)}
    lines = comparison(start, end)
    code = next(line for line in lines if line.startswith("code "))
    assert "0.49±0.03 -> 0.61±0.03 (+2.8 SE)" in code  # 0.12 / hypot(0.03, 0.03)
    assert any(line.startswith("code:budget8") for line in lines)
    # the mean over environments without a budget: (0.49 + 0.13) / 2 -> (0.61 + 0.12) / 2
    assert lines[-1] == "mean reward (2 environments) 0.310 -> 0.365 (+5.5 points)"


def test_rarely_right_names_the_environments_under_one_right_sample_in_a_hundred():
    none = summarise(np.array([[-0.1, 0.3], [0.0, 0.0]]), np.zeros((2, 2), dtype=bool), k=1)
    one_in_200 = summarise(np.zeros((200, 1)), np.arange(200)[:, None] == 0, k=1)
    two_in_200 = summarise(np.zeros((200, 1)), np.arange(200)[:, None] < 2, k=1)
    results = {"tool_use": none, "tool_use:budget8": none, "math": one_in_200, "code": two_in_200}
    # shaping rewards alone do not count as right; budgeted variants are not named twice
    assert rarely_right(results) == ["tool_use", "math"]
    assert rarely_right({"code": two_in_200}) == []
