"""Reward functions, small and composable, keyed by name and configured per environment.

    from rewards import RewardContext, combine
    total, parts = combine(["format", "overlong:0.5"], ctx)   # name or name:weight

Environments score correctness themselves (math equivalence, code tests, ...); these functions
add shaping on top. The total and every part go into the step's `info["reward_breakdown"]`.
"""

from rewards import shaping as _shaping  # noqa: F401  (registers the built-in shaping rewards)
from rewards.base import REWARDS, RewardContext, RewardFn, combine, get_reward, register_reward

__all__ = ["REWARDS", "RewardContext", "RewardFn", "combine", "get_reward", "register_reward"]
