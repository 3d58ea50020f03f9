"""The reward protocol, the context every reward sees, and the registry keyed by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class RewardContext:
    """What a reward function may look at for one finished episode (or turn)."""

    response: str
    """The policy's final response text."""
    correct: float = 0.0
    """The environment's own correctness score in [0, 1]."""
    response_tokens: int = 0
    """Tokens the policy generated in the episode."""
    max_tokens: int = 0
    """The generation limit (0: unknown)."""
    thinking_tokens: int = 0
    """Tokens spent between <think> and </think>."""
    thinking_budget: int = 0
    """The thinking budget of the request (0: none)."""
    truncated: bool = False
    """Generation stopped at the token limit."""
    extra: dict = field(default_factory=dict)
    """Environment-specific facts (e.g. malformed tool calls)."""


class RewardFn(Protocol):
    def __call__(self, ctx: RewardContext) -> float: ...


REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make a reward available by `name` in environment configs."""

    def wrap(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return wrap


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        close = difflib.get_close_matches(name, REWARDS, n=3) or sorted(REWARDS)
        raise KeyError(f"unknown reward {name!r}; did you mean: {', '.join(close)}")
    return REWARDS[name]


def parse_spec(spec: str) -> tuple[str, float]:
    """`name` or `name:weight` -> (name, weight)."""
    name, _, weight = spec.partition(":")
    try:
        return name, float(weight) if weight else 1.0
    except ValueError:
        raise ValueError(f"reward spec {spec!r} is not name or name:weight") from None


def combine(specs: Sequence[str], ctx: RewardContext) -> tuple[float, dict[str, float]]:
    """Correctness plus each configured reward (weighted); returns (total, parts)."""
    parts = {"correct": float(ctx.correct)}
    for spec in specs:
        name, weight = parse_spec(spec)
        parts[name] = weight * float(get_reward(name)(ctx))
    return sum(parts.values()), parts
