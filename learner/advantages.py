"""Group-relative advantages (pure tensor functions; no Ray, no DeepSpeed).

rewards (N, G): N groups (prompts) of G samples each -> advantages (N, G).

- `grpo`: (r - mean) / (std + eps), std with Bessel's correction (as TRL and DeepSeekMath do).
- `loo`: leave-one-out baseline, r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean).
- `drgrpo`: Dr. GRPO, mean-centred only (no std scaling, which biases toward easy/hard prompts).
"""

from __future__ import annotations

import torch

KINDS = ("grpo", "loo", "drgrpo")


def group_advantages(rewards: torch.Tensor, kind: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """rewards (N, G) -> advantages (N, G)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (groups, samples>=2); got {tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)  # (N, 1)
    centred = rewards - mean
    if kind == "grpo":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    if kind == "loo":
        g = rewards.shape[1]
        return centred * g / (g - 1)
    if kind == "drgrpo":
        return centred
    raise ValueError(f"unknown advantage {kind!r}; choose one of {KINDS}")


def informative_groups(rewards: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """rewards (N, G) -> (N,) True where rewards differ (dynamic sampling keeps only these)."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > tol
