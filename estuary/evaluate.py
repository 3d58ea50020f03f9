"""Held-out evaluation per environment, at each thinking budget: mean reward +- standard error,
pass@1 and pass@k, on enough instances to resolve the effects a run reports.

    results = evaluate(policy, cfg.environments, cfg.eval, cfg.rollout, seed=0)
    results["math"]["reward"], results["math"]["reward_se"], results["math:budget8"]["pass_at_4"]

Instances use seeds `eval.seed_offset + i` (training seeds stay below `seed_offset`), with
`eval.samples_per_instance` samples each, the training sampling settings and, per environment
and budget, a fresh engine seeded by `seed`: the same weights always get the same score, whatever
other environments are evaluated. An environment's instances go to the engine as one batch (each
prompt prefilled once for its n samples). A budget is stated in the prompts, as in training.
Pass rates count exact correctness (the environment's `correct` part is 1), never shaped reward;
an episode whose environment failed counts as wrong, with reward 0 (`failed` says how many).
`estuary eval CHECKPOINT` runs this from the command line.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from configs.schema import EnvironmentConfig, EvalConfig, RolloutConfig
from environments import env_factory
from estuary.eval_stats import summarise
from rollout.episodes import Prompt, run_groups
from rollout.worker import sampling_params
from streams.trajectory import TrajectoryGroup

log = logging.getLogger(__name__)


def evaluate(policy, envs: dict[str, EnvironmentConfig], cfg: EvalConfig, rollout: RolloutConfig,
             seed: int = 0, only: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Results keyed `env` (no budget) and `env:budgetN`, each from `summarise` plus `failed`."""
    from rollout.torch_engine import TorchEngine

    names = [n for n in envs if only is None or n in only]
    params, n = sampling_params(rollout), cfg.samples_per_instance
    slots = max(rollout.max_concurrent_episodes, n)  # a request's n samples must fit at once
    results: dict[str, dict[str, float]] = {}
    with ThreadPoolExecutor(max_workers=max(1, sum(envs[e].concurrency for e in names))) as pool:
        for name in names:
            env, make = envs[name], env_factory(envs[name])
            for budget in [None, *cfg.budgets]:
                engine = TorchEngine(policy, max_batch=slots, max_len=rollout.max_len, seed=seed)
                prompts = [Prompt(name, env.id, make, cfg.seed_offset + i, env.timeout_s, thinking_budget=budget)
                           for i in range(cfg.instances)]
                groups = run_groups(engine, policy.tokenizer, prompts, n, params, pool, rollout.max_len)
                key = name if budget is None else f"{name}:budget{budget}"
                results[key] = _scores(groups, n, cfg.pass_k)
                reasons = Counter(r for g in groups for r in g.metadata["failed"])
                if reasons:  # scored as wrong: say why, a failing environment is not a weak policy
                    log.warning("eval %s: %d episodes failed: %s", key, sum(reasons.values()),
                                "; ".join(f"{count} x {r[:120]}" for r, count in reasons.most_common(3)))
    return results


def _scores(groups: list[TrajectoryGroup], n: int, k: int) -> dict[str, float]:
    """Per-instance rewards and exact correctness (I, n) -> `summarise`; failed episodes fill the rest."""
    rewards = np.zeros((len(groups), n))
    correct = np.zeros((len(groups), n), dtype=bool)
    failed = 0
    for i, group in enumerate(groups):
        failed += len(group.metadata["failed"])
        for j, s in enumerate(group.samples):
            rewards[i, j] = s.reward
            correct[i, j] = s.reward_parts.get("correct", 0.0) >= 1.0
    return {**summarise(rewards, correct, k), "failed": float(failed)}
