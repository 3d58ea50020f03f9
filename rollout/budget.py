"""Reasoning-budget control: after N thinking tokens (and a short grace to reach a newline),
force `</think>` so the answer follows. Pure per-sequence bookkeeping, shared by both engines.

    ctl = BudgetControl(think_open, think_close, newline_ids)
    st = ctl.start(budget=32, grace=4, prompt_ids=prompt)
    forced = ctl.forced_token(st)      # None, or the token id to emit instead of sampling
    ctl.observe(st, token_id)          # after every emitted token
"""

from __future__ import annotations

from dataclasses import dataclass


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
