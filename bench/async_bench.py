"""Asynchronous vs synchronous GRPO on the same config and seed: time to a target eval reward.

    .venv/bin/python -m bench.async_bench [--config tiny_cpu] [--target 0.2] [--env NAME] [key=value ...]

Prepares the starting policy once (preset, SFT warm start, MTP heads: the stages before RL are
the same for both and not what is compared), then runs `estuary train` from it twice with the
same config and seed, `run.mode=async` then `run.mode=sync` (generate-then-train: rollouts wait
for the learner and the learner for the rollouts). For each: wall time of the RL stage until the
held-out eval reward (the mean over environments, or `--env`'s) first reaches `--target`, counted
from the step-0 evaluation (evaluations every `eval.every_steps`; their time counts for both), and
optimizer steps per hour over the same span. Ratios are sync/async (above 1: asynchronous is better; 2 is the limit when generation and
training overlap perfectly).

Prints a table, then `RESULT async_time_to_target_s ...` and `RESULT async_steps_per_hour ...`.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path


def reward_of(rewards: dict[str, float], env: str | None) -> float:
    """One evaluation's reward: `env`'s, or the mean over environments."""
    if env is not None:
        if env not in rewards:
            raise SystemExit(f"--env {env!r} is not evaluated; choose one of {sorted(rewards)}")
        return rewards[env]
    return sum(rewards.values()) / max(1, len(rewards))


def time_to(timeline: list[tuple[float, int, dict[str, float]]], target: float, env: str | None = None) -> float:
    """Seconds of RL until the eval reward first reached `target` (inf if it never did), counted
    from the step-0 evaluation: what comes before it (services, actors, the start evaluation,
    which the first mode computes and the second reuses from the cache) is not what is compared."""
    start = timeline[0][0]
    return next((t - start for t, _, rewards in timeline if reward_of(rewards, env) >= target), math.inf)


def steps_per_hour(timeline: list[tuple[float, int, dict[str, float]]]) -> float:
    """Optimizer steps per hour of RL, from the step-0 evaluation to the last (evaluations included)."""
    (first, v0, _), (last, v1, _) = timeline[0], timeline[-1]
    return (v1 - v0) / max(last - first, 1e-9) * 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny_cpu")
    parser.add_argument("--target", type=float, default=0.2, help="eval reward to reach")
    parser.add_argument("--env", default=None, help="the environment whose eval reward counts (default: the mean)")
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs")
    args = parser.parse_args()

    from configs import load_config
    from estuary.run_setup import prepare_policy
    from estuary.train import train

    rows = {}
    with tempfile.TemporaryDirectory() as out:
        base = load_config(args.config, [f"run.output_dir={out}", *args.overrides])
        policy = prepare_policy(base, Path(out) / "start")
        for mode in ("async", "sync"):
            cfg = load_config(args.config, [*args.overrides, f"run.output_dir={out}", f"run.name=bench-{mode}",
                                            f"run.mode={mode}", f"model.path={policy}", "sft.steps=0"])
            result = train(cfg)
            print(f"{mode}: " + "  ".join(f"{t:.0f}s v{v} {reward_of(r, args.env):.3f}" for t, v, r in result.timeline),
                  flush=True)
            rows[mode] = (time_to(result.timeline, args.target, args.env), steps_per_hour(result.timeline),
                          reward_of(result.timeline[-1][2], args.env), result.seconds)
    print(f"{'mode':<6} {'to target s':>12} {'steps/h':>9} {'final reward':>13} {'wall s':>8}")
    for mode, (to_target, per_hour, final, wall) in rows.items():
        print(f"{mode:<6} {to_target:>12.1f} {per_hour:>9.1f} {final:>13.3f} {wall:>8.1f}")
    (a_t, a_h, _, _), (s_t, s_h, _, _) = rows["async"], rows["sync"]
    ratio_t = s_t / a_t if math.isfinite(a_t) and math.isfinite(s_t) else float("nan")
    print(f"RESULT async_time_to_target_s ours={a_t:.1f} baseline={s_t:.1f} ratio={ratio_t:.2f}")
    print(f"RESULT async_steps_per_hour ours={a_h:.1f} baseline={s_h:.1f} ratio={a_h / s_h:.2f}")


if __name__ == "__main__":
    main()
