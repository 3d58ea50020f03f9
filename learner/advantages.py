"""Group-relative advantages (pure tensor functions; no Ray, no DeepSpeed).

rewards (N, G): N groups (prompts) of G samples each -> advantages (N, G).

- `grpo`: (r - mean) / (std + eps), std with Bessel's correction (as TRL and DeepSeekMath do).
- `loo`: leave-one-out baseline, r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean).
- `drgrpo`: Dr. GRPO, mean-centred only (no std scaling, which biases toward easy/hard prompts).

`task_and_shaping_advantages` is what the learner uses: the estimator above on the task reward
(correctness) plus the shaping terms (format, malformed calls, length) mean-centred and never
std-scaled, so a group that differs only by a 0.1 bonus gets 0.1-sized advantages instead of
looking like right-vs-wrong.
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


def task_and_shaping_advantages(task: torch.Tensor, shaping: torch.Tensor, kind: str = "grpo",
                                eps: float = 1e-6) -> torch.Tensor:
    """task (N, G) correctness, shaping (N, G) sum of shaping terms -> advantages (N, G).

    advantage = kind's advantage of `task` + the group-centred `shaping`, unscaled (with the
    leave-one-out baseline for `loo`). Scaling the shaping by the task reward's std would make
    it as loud as correctness where the task reward barely varies, and dividing by its own std
    would blow a 0.1 bonus up to unit size. With `drgrpo` and `loo` (no std scaling) this equals
    the estimator on the total reward; only `grpo` changes.
    """
    if task.shape != shaping.shape:
        raise ValueError(f"task {tuple(task.shape)} and shaping {tuple(shaping.shape)} rewards differ in shape")
    baseline = "loo" if kind == "loo" else "drgrpo"
    return group_advantages(task, kind, eps) + group_advantages(shaping, baseline)  # (N, G)


def informative_groups(rewards: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """rewards (N, G) total -> (N,) True where rewards differ (dynamic sampling keeps only these).

    A group whose task rewards tie but whose shaping differs is kept on purpose: its advantages
    are on the shaping's own small scale (see `task_and_shaping_advantages`), and when every
    sample fails it is the only signal there is (a valid tool call, a closed `<think>`).
    """
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > tol
