"""Held-out evaluation: mean reward and pass rate per environment, at each thinking budget.

    results = evaluate(policy, cfg.environments, cfg.eval, cfg.rollout, seed=0)
    results["math"]["reward"], results["math:budget8"]["pass_rate"]   # thinking budget 8

Instances use seeds `eval.seed_offset + i` (training seeds stay below `seed_offset`), one sample
each, with the training sampling settings and a fresh engine seeded by `seed`, so the same
weights always get the same score. `estuary eval CHECKPOINT` runs this from the command line.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from configs.schema import EnvironmentConfig, EvalConfig, RolloutConfig
from rollout.episodes import Prompt, run_groups
from rollout.worker import env_factory, sampling_params


def evaluate(policy, envs: dict[str, EnvironmentConfig], cfg: EvalConfig, rollout: RolloutConfig,
             seed: int = 0, only: list[str] | None = None) -> dict[str, dict[str, float]]:
    from rollout.torch_engine import TorchEngine

    names = [n for n in envs if only is None or n in only]
    factories = {n: env_factory(envs[n]) for n in names}
    base = sampling_params(rollout)
    results: dict[str, dict[str, float]] = {}
    batch = max(1, rollout.max_concurrent_episodes)
    with ThreadPoolExecutor(max_workers=max(1, sum(envs[n].concurrency for n in names))) as pool:
        for budget in [None, *cfg.budgets]:
            params = replace(base, thinking_budget=budget)
            engine = TorchEngine(policy, max_batch=batch, max_len=rollout.max_len, seed=seed)
            prompts = [Prompt(n, envs[n].id, factories[n], cfg.seed_offset + i, envs[n].timeout_s)
                       for n in names for i in range(cfg.instances)]
            groups = []
            for start in range(0, len(prompts), batch):
                groups += run_groups(engine, policy.tokenizer, prompts[start: start + batch], 1, params, pool,
                                     rollout.max_len)
            for name in names:
                samples = [s for g in groups if g.metadata["env"] == name for s in g.samples]
                key = name if budget is None else f"{name}:budget{budget}"
                results[key] = {
                    "reward": float(np.mean([s.reward for s in samples])) if samples else 0.0,
                    "pass_rate": float(np.mean([s.reward_parts.get("correct", 0.0) >= 1 for s in samples]))
                    if samples else 0.0,
                    "instances": float(len(samples)),
                }
    return results
