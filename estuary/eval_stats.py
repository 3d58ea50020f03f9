"""Evaluation statistics: mean +- standard error, pass@1 and unbiased pass@k over instances.

    summarise(rewards, correct, k=4)   # rewards (I, n) float, correct (I, n) bool
    -> {"reward": .., "reward_se": .., "pass_at_1": .., "pass_at_1_se": .., "pass_at_4": .., ...}

Pure functions (numpy and the standard library only). The n samples of one instance are not
independent draws of the eval set, so every standard error is taken across instances, over the
per-instance means: sd(per-instance values, ddof=1) / sqrt(I).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1):
    1 - C(n-c, k) / C(n, k), the chance that k of the n drawn without replacement hold a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # exact integers: no overflow for large n


def mean_and_se(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """values (m,) -> (mean, standard error of the mean); the error is NaN for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def summarise(rewards: np.ndarray, correct: np.ndarray, k: int) -> dict[str, float]:
    """rewards (I, n) float, correct (I, n) bool -> the means and standard errors reported per environment.

    `pass_at_1` is the mean exact correctness over all samples; `pass_at_{k}` (k > 1) the unbiased
    estimator per instance, averaged over instances. Keys avoid `@` (MLflow metric names).
    """
    if rewards.shape != correct.shape or rewards.ndim != 2:
        raise ValueError(f"rewards {rewards.shape} and correct {correct.shape} must both be (instances, n)")
    instances, n = rewards.shape
    counts = correct.sum(axis=1).astype(int)  # (I,) correct samples per instance
    out: dict[str, float] = {"instances": float(instances), "samples": float(instances * n)}
    out["reward"], out["reward_se"] = mean_and_se(rewards.mean(axis=1))
    out["pass_at_1"], out["pass_at_1_se"] = mean_and_se(counts / n)
    if k > 1:
        per_instance = [pass_at_k(n, int(c), k) for c in counts]
        out[f"pass_at_{k}"], out[f"pass_at_{k}_se"] = mean_and_se(per_instance)
    return out


def rarely_right(results: dict[str, dict[str, float]], below: float = 0.01) -> list[str]:
    """Environments (budgeted variants left out) whose pass@1 is under `below` (1 in 100).

    RL sharpens what a policy sometimes does: where the warm start almost never succeeds, a run
    has little but shaping rewards to learn from there (tool_use at 1 of 512 rose +0.0 standard
    errors in session 39's g2), and its pass rate is unlikely to rise."""
    return [n for n, r in results.items() if ":budget" not in n and r["pass_at_1"] < below]


def plus_minus(mean: float, se: float) -> str:
    """`0.42±0.03` (the error left out when it is unknown)."""
    return f"{mean:.2f}" if math.isnan(se) else f"{mean:.2f}±{se:.2f}"


def _change(a: dict[str, float], b: dict[str, float], key: str) -> str:
    """`0.49±0.03 -> 0.61±0.03 (+2.7 SE)`: the change in standard errors of the difference."""
    se = math.hypot(a[key + "_se"], b[key + "_se"])
    moved = "" if math.isnan(se) or se == 0 else f" ({(b[key] - a[key]) / se:+.1f} SE)"
    return f"{plus_minus(a[key], a[key + '_se'])} -> {plus_minus(b[key], b[key + '_se'])}{moved}"


def comparison(start: dict[str, dict[str, float]], end: dict[str, dict[str, float]]) -> list[str]:
    """Per environment (budgeted variants included), pass@1 and reward from `start` to `end` with
    the change in standard errors of the difference, then the mean reward over the environments
    without a budget (points are hundredths of reward). Lines of text, for the end of a run."""
    names = [n for n in start if n in end]
    width = max([len(n) for n in names] + [11])
    lines = [f"{'environment':<{width}}  {'pass@1 start -> end':<32}  reward start -> end"]
    for n in names:
        lines.append(f"{n:<{width}}  {_change(start[n], end[n], 'pass_at_1'):<32}  "
                     f"{_change(start[n], end[n], 'reward')}")
    plain = [n for n in names if ":budget" not in n]
    if plain:
        a, b = (float(np.mean([r[n]["reward"] for n in plain])) for r in (start, end))
        lines.append(f"mean reward ({len(plain)} environments) {a:.3f} -> {b:.3f} ({100 * (b - a):+.1f} points)")
    return lines
