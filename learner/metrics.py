"""Per-environment rollout metrics of the groups a step trained on (plain floats, for MLflow).

    group_metrics(groups) -> {"math/reward_mean": 0.41, "math/pass_rate": 0.38, ...}

For each environment (the config name in the group's metadata, else its id): reward mean and
std, pass rate (share of samples whose `correct` part is 1), policy tokens per sample, the share
of samples cut at the length limit (truncation rate) and of samples where budget control forced
`</think>` (budget-hit rate), episodes that failed, and mean turns.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from streams.trajectory import FORCED, POLICY, TrajectoryGroup


def group_metrics(groups: list[TrajectoryGroup]) -> dict[str, float]:
    by_env: dict[str, list] = defaultdict(list)
    failed: dict[str, int] = defaultdict(int)
    for group in groups:
        name = group.metadata.get("env", group.env_id)
        by_env[name] += group.samples
        failed[name] += len(group.metadata.get("failed", []))
    out: dict[str, float] = {}
    for name, samples in by_env.items():
        rewards = np.array([s.reward for s in samples])
        out[f"{name}/reward_mean"] = float(rewards.mean())
        out[f"{name}/reward_std"] = float(rewards.std())
        out[f"{name}/pass_rate"] = float(np.mean([s.reward_parts.get("correct", 0.0) >= 1.0 for s in samples]))
        out[f"{name}/response_tokens"] = float(np.mean([(s.loss_mask != 0).sum() for s in samples]))
        out[f"{name}/truncation_rate"] = float(np.mean([s.finish_reason == "length" for s in samples]))
        out[f"{name}/budget_hit_rate"] = float(np.mean([(s.loss_mask == FORCED).any() for s in samples]))
        out[f"{name}/episodes_failed"] = float(failed[name])
        out[f"{name}/policy_tokens"] = float(sum(int((s.loss_mask == POLICY).sum()) for s in samples))
    return out
