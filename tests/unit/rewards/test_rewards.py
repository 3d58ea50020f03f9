"""Reward functions against hand-computed values."""

from __future__ import annotations

import pytest

from rewards import RewardContext, combine, get_reward
from rewards.math import math_equal, normalise_gold
from rewards.shaping import soft_overlong


def test_soft_overlong_matches_dapo():
    # max 100, cache 20: free up to 80, linear to -1 at 100, -1 beyond
    assert soft_overlong(80, 100, 20) == 0.0
    assert soft_overlong(90, 100, 20) == pytest.approx(-0.5)
    assert soft_overlong(100, 100, 20) == pytest.approx(-1.0)
    assert soft_overlong(130, 100, 20) == -1.0


def test_format_and_boxed():
    fmt, boxed = get_reward("format"), get_reward("boxed")
    assert fmt(RewardContext("<think>a</think> 5")) == pytest.approx(0.1)
    assert fmt(RewardContext("<think>a</think>")) == 0.0  # nothing after the thinking
    assert fmt(RewardContext("no thinking 5")) == 0.0
    assert fmt(RewardContext("<think>a</think><think>b</think> 5")) == 0.0
    assert boxed(RewardContext("<think>x</think> \\boxed{3}")) == pytest.approx(0.1)
    assert boxed(RewardContext("<think>\\boxed{3}</think> 3")) == 0.0


def test_code_block_form_flags_answers_that_are_not_one_clean_python_block():
    form = get_reward("code_block")
    good = "<think>Write the function.</think>\n```python\ndef f(x):\n    return x + 3\n```"
    assert form(RewardContext(good)) == 0.0
    assert form(RewardContext(good.replace("x + 3", "x + 4"))) == 0.0  # wrong but well formed
    malformed = [
        "<think>Write</think>\ndef f(x):\n    return x\n",  # no fence
        good + "\nThe answer is 4.",  # text after it
        good + "\n```python\nprint(1)\n```",  # two blocks
        good.replace("x + 3", "x }</think>\nThe answer is 3"),  # a second </think>
        good.replace("x + 3", "x {\"<tool_call>"),  # tool_use's markup
        good.replace("x + 3", "\\boxed{20}"),  # math's
        "<think>Write</think>}</tool_call> a</think>\n```python\ndef f(x):\n    return x\n```",
        "```python\ndef f(x):\n    return x\n```",  # no thinking
        "<think>Write the function.</think>\n```python\ndef f(x):\n    return x",  # cut off
    ]
    for text in malformed:
        assert form(RewardContext(text)) == pytest.approx(-0.1), text
    # a penalty, not a bonus: a hack verdict's zeroing of bonuses leaves it, and it never pays
    total, parts = combine(["code_block"], RewardContext(good, correct=1.0))
    assert (total, parts["code_block"]) == (1.0, 0.0)


def test_budget_cost_pays_only_correct_answers_under_budget():
    budget = get_reward("budget")
    assert budget(RewardContext("", correct=1.0, thinking_tokens=25, thinking_budget=100)) == pytest.approx(0.15)
    assert budget(RewardContext("", correct=0.0, thinking_tokens=0, thinking_budget=100)) == 0.0
    assert budget(RewardContext("", correct=1.0, thinking_tokens=150, thinking_budget=100)) == 0.0
    assert budget(RewardContext("", correct=1.0, thinking_tokens=10, thinking_budget=0)) == 0.0


def test_length_penalty_and_combine_with_weights():
    ctx = RewardContext("x", correct=1.0, response_tokens=50, max_tokens=100)
    assert get_reward("length")(ctx) == pytest.approx(-0.05)
    total, parts = combine(["length:2", "overlong"], ctx)
    assert parts == {"correct": 1.0, "length": pytest.approx(-0.1), "overlong": 0.0}
    assert total == pytest.approx(0.9)


def test_unknown_reward_and_bad_spec():
    with pytest.raises(KeyError, match="format"):
        combine(["formt"], RewardContext("x"))
    with pytest.raises(ValueError, match="name:weight"):
        combine(["format:heavy"], RewardContext("x"))


def test_math_equal_forms():
    assert normalise_gold("48 + 24 = 72\n#### 72") == "$72$"
    assert math_equal("<think>48+24</think> The answer is \\boxed{72}.", "#### 72")
    assert math_equal("\\boxed{\\frac{1}{2}}", "0.5")
    assert math_equal("so x = 3", "3")
    assert not math_equal("\\boxed{71}", "72")
    assert not math_equal("", "72")
    # only the answer after the thinking counts
    assert not math_equal("<think>\\boxed{72}</think> \\boxed{5}", "72")
