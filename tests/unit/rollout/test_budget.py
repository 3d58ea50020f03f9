"""Budget control as a state machine: closes after budget (+ grace, or at a newline)."""

from __future__ import annotations

import random

from rollout.budget import BudgetControl, draw_budget, with_budget

OPEN, CLOSE, NL, X = 1, 2, 3, 9
ctl = BudgetControl(OPEN, CLOSE, {NL})


def _run(budget, grace, sampled, prompt=(OPEN,)):
    """Feed `sampled` tokens unless a token is forced; returns the emitted stream and flags."""
    st = ctl.start(budget, grace, list(prompt))
    out, flags = [], []
    for tok in sampled:
        forced = ctl.forced_token(st)
        emit = forced if forced is not None else tok
        out.append(emit)
        flags.append(forced is not None)
        ctl.observe(st, emit)
        if forced is not None:
            break
    return out, flags, st


def test_forces_close_after_budget_plus_grace():
    out, flags, st = _run(3, 2, [X] * 10)
    assert out == [X, X, X, X, X, CLOSE] and flags[-1] and not any(flags[:-1])
    assert st.used == 5 and st.closed


def test_newline_inside_grace_closes_early():
    out, flags, _ = _run(3, 4, [X, X, X, X, NL, X, X, X])
    assert out == [X, X, X, X, NL, CLOSE]


def test_policy_closing_itself_is_untouched():
    out, flags, st = _run(5, 2, [X, CLOSE, X, X, X, X, X, X, X, X])
    assert CLOSE in out and not any(flags)


def test_no_budget_and_outside_think_are_untouched():
    out, flags, _ = _run(None, 2, [X] * 10)
    assert not any(flags)
    out, flags, _ = _run(2, 0, [X] * 10, prompt=())  # never opened <think>
    assert not any(flags)
    out, flags, _ = _run(2, 0, [X, OPEN, X, X, X], prompt=())  # opens it itself
    assert out == [X, OPEN, X, X, CLOSE]


def test_the_budget_is_stated_in_the_system_message():
    user = [{"role": "user", "content": "Compute 2 + 3."}]
    assert with_budget(user, None) == user
    assert with_budget(user, 12) == [{"role": "system", "content": "Thinking budget: 12 tokens."}, *user]
    system = [{"role": "system", "content": "Use the tools."}, *user]
    stated = with_budget(system, 7)
    assert stated == [{"role": "system", "content": "Use the tools.\nThinking budget: 7 tokens."}, *user]
    assert system[0]["content"] == "Use the tools."  # the environment's own history is untouched


def test_draw_budget_is_seeded_and_inclusive():
    draws = [draw_budget((3, 5), random.Random(seed)) for seed in range(50)]
    assert set(draws) == {3, 4, 5}
    assert draws == [draw_budget((3, 5), random.Random(seed)) for seed in range(50)]
    assert draw_budget(None, random.Random(0)) is None
