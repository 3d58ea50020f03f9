"""Built-in shaping rewards: format, a code block's form, length, DAPO's soft overlong penalty,
a thinking-budget cost."""

from __future__ import annotations

import re

from rewards.base import RewardContext, register_reward

_THINK = re.compile(r"<think>.*?</think>", re.S)
_BOXED = re.compile(r"\\boxed\{")

FORMAT_BONUS = 0.1
MALFORMED_ANSWER = -0.1
# One fenced python block and nothing else after the thinking (the form the code prompt asks for).
_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S)
# Other tasks' markup: a tiny policy trained on four environments leaks it into code answers.
_FOREIGN = ("<think>", "</think>", "<tool_call>", "</tool_call>", "\\boxed")


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


@register_reward("code_block")
def code_block_form(ctx: RewardContext) -> float:
    """-0.1 unless the answer after one closed thinking block is a single ```python block.

    Why: code's all-fail groups are dropped by dynamic sampling, so nothing pushed down the other
    tasks' text (`\\boxed{20}`, `<tool_call>`, a second `</think>`) that took over code answers in
    about one run in four. With this term, a group of wrong answers that differ in form is kept,
    with advantages on the 0.1 scale, and the malformed ones are the ones pushed down.
    """
    text = ctx.response
    if text.count("</think>") != 1 or text.count("<think>") > 1:
        return MALFORMED_ANSWER
    after = text.split("</think>", 1)[1].strip()
    match = _CODE_BLOCK.fullmatch(after)
    if match is None or after.count("```") != 2 or any(tag in match.group(1) for tag in _FOREIGN):
        return MALFORMED_ANSWER
    return 0.0


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
