"""Built-in shaping rewards: format, length, DAPO's soft overlong penalty, a thinking-budget cost."""

from __future__ import annotations

import re

from rewards.base import RewardContext, register_reward

_THINK = re.compile(r"<think>.*?</think>", re.S)
_BOXED = re.compile(r"\\boxed\{")

FORMAT_BONUS = 0.1


@register_reward("format")
def format_reward(ctx: RewardContext) -> float:
    """+0.1 when the response thinks in one closed <think> block and then states an answer."""
    text = ctx.response
    if text.count("<think>") != 1 or text.count("</think>") != 1 or not _THINK.search(text):
        return 0.0
    after = text.split("</think>", 1)[1]
    return FORMAT_BONUS if after.strip() else 0.0


@register_reward("boxed")
def boxed_reward(ctx: RewardContext) -> float:
    """+0.1 when the answer after the thinking is given in \\boxed{...}."""
    after = ctx.response.split("</think>", 1)[-1]
    return FORMAT_BONUS if _BOXED.search(after) else 0.0


@register_reward("length")
def length_penalty(ctx: RewardContext) -> float:
    """Linear cost of response length: -0.1 at the token limit, 0 for an empty response."""
    if ctx.max_tokens <= 0:
        return 0.0
    return -0.1 * min(1.0, ctx.response_tokens / ctx.max_tokens)


def soft_overlong(length: int, max_tokens: int, cache: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max-cache, linear to -1 at max, -1 beyond."""
    start = max_tokens - cache
    if length <= start:
        return 0.0
    if length <= max_tokens:
        return (start - length) / cache
    return -1.0


@register_reward("overlong")
def overlong_penalty(ctx: RewardContext) -> float:
    """DAPO soft overlong penalty with a cache of a quarter of the limit."""
    if ctx.max_tokens <= 0:
        return 0.0
    return soft_overlong(ctx.response_tokens, ctx.max_tokens, max(1, ctx.max_tokens // 4))


@register_reward("budget")
def budget_cost(ctx: RewardContext) -> float:
    """Budget-aware length cost: correct answers earn up to +0.2 for thinking under budget.

    Only correct answers are shaped, so the policy is never paid for answering early and wrong;
    at or over budget the bonus is 0.
    """
    if ctx.thinking_budget <= 0 or ctx.correct <= 0:
        return 0.0
    unused = max(0.0, 1.0 - ctx.thinking_tokens / ctx.thinking_budget)
    return 0.2 * unused * ctx.correct
