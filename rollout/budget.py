"""Reasoning-budget control: after N thinking tokens (and a short grace to reach a newline),
force `</think>` so the answer follows. Pure per-sequence bookkeeping, shared by both engines.

    budget = draw_budget((8, 32), rng)                # once per prompt: its G samples share it
    messages = with_budget(messages, budget)          # the policy reads it in its system message
    ctl = BudgetControl(think_open, think_close, newline_ids)
    st = ctl.start(budget=32, grace=4, prompt_ids=prompt)
    forced = ctl.forced_token(st)      # None, or the token id to emit instead of sampling
    ctl.observe(st, token_id)          # after every emitted token

A budget is drawn per prompt, not per sample, and stated in the prompt: a reward that depends on
a budget the policy cannot see, or that differs within a group, is noise in the advantage.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


def draw_budget(spec: tuple[int, int] | None, rng: random.Random, unbudgeted: float = 0.0) -> int | None:
    """One budget from the inclusive range `spec`; None (no budget) without a range, or with
    probability `unbudgeted`."""
    if spec is None or (unbudgeted and rng.random() < unbudgeted):
        return None
    return rng.randint(int(spec[0]), int(spec[1]))


def budget_line(budget: int) -> str:
    return f"Thinking budget: {budget} tokens."


def with_budget(messages: list[dict[str, str]], budget: int | None) -> list[dict[str, str]]:
    """The conversation as the policy sees it: the budget stated in its system message.

    Appended to an existing system message, else a system message of its own goes first; the
    messages are copied (environments keep their own history).
    """
    if budget is None:
        return list(messages)
    line = budget_line(budget)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0], content=f"{messages[0]['content']}\n{line}")
        return [first, *messages[1:]]
    return [{"role": "system", "content": line}, *messages]


@dataclass
class BudgetState:
    budget: int | None
    grace: int
    thinking: bool = False
    used: int = 0
    """Thinking tokens emitted so far (inside <think>, excluding the tags)."""
    closed: bool = False
    pending_close: bool = False


class BudgetControl:
    def __init__(self, think_open: int, think_close: int, newline_ids: set[int]) -> None:
        self.think_open = think_open
        self.think_close = think_close
        self.newline_ids = newline_ids

    def start(self, budget: int | None, grace: int, prompt_ids: list[int]) -> BudgetState:
        """A prompt that ends inside an open <think> starts in thinking mode."""
        state = BudgetState(budget=budget, grace=grace)
        for tok in prompt_ids:
            if tok == self.think_open:
                state.thinking, state.closed = True, False
            elif tok == self.think_close:
                state.thinking, state.closed = False, True
        return state

    def forced_token(self, state: BudgetState) -> int | None:
        if state.budget is None or not state.thinking:
            return None
        if state.pending_close or state.used >= state.budget + state.grace:
            return self.think_close
        return None

    def observe(self, state: BudgetState, token: int) -> None:
        if token == self.think_open:
            state.thinking = True
            return
        if token == self.think_close:
            state.thinking, state.closed, state.pending_close = False, True, False
            return
        if state.thinking:
            state.used += 1
            over = state.budget is not None and state.used >= state.budget
            if over and token in self.newline_ids:
                state.pending_close = True  # the line is finished: close right after it
