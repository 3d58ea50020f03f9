"""What a run reports: MLflow params, metrics and artifacts, and one line per step for a person.

On a terminal the step lines are rewritten in place (a live view); elsewhere (CI, `ray job
submit` logs) each is printed once, plain. The summary at the end names the MLflow run and the
command that opens its UI.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from estuary.eval_stats import comparison, plus_minus, rarely_right


def eval_summary(r: dict[str, float]) -> str:
    """`reward 0.42±0.03 pass@1 0.12±0.02 pass@4 0.30±0.04` from one environment's eval results."""
    parts = [f"reward {plus_minus(r['reward'], r['reward_se'])}"]
    for key in sorted((k for k in r if k.startswith("pass_at_") and not k.endswith("_se")),
                      key=lambda k: int(k.removeprefix("pass_at_"))):
        parts.append(f"pass@{key.removeprefix('pass_at_')} {plus_minus(r[key], r[key + '_se'])}")
    if r.get("failed"):  # counted as wrong: say so, a failing environment is not a weak policy
        parts.append(f"({int(r['failed'])} failed)")
    return " ".join(parts)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


class RunLog:
    def __init__(self, mlflow_run, resolved_yaml: str, config_tree: dict, run_dir: Path, max_steps: int) -> None:
        import mlflow

        self.mlflow, self.run = mlflow, mlflow_run
        self.max_steps, self.start = max_steps, time.monotonic()
        self.tty = sys.stdout.isatty()
        self.last_line = ""
        self.totals: dict[str, float] = {}  # rollout counters at the previous step
        self.last_step_at = time.monotonic()
        params = flatten(config_tree)
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(list(params.items())[i: i + 100]))
        (run_dir / "config.yaml").write_text(resolved_yaml)
        mlflow.log_artifact(str(run_dir / "config.yaml"))

    def say(self, text: str) -> None:
        if self.tty and self.last_line:
            sys.stdout.write("\n")
        print(text, flush=True)
        self.last_line = ""

    def step(self, report, rollout: dict[str, float], produce_s: float | None = None) -> None:
        """Log a `learner.worker.StepReport` (summarised by the learner actor) and the rollout
        counters; `produce_s`: in sync mode, the seconds the step spent generating first."""
        version, stats = report.version, report.stats
        metrics = {f"learner/{k}": float(v) for k, v in stats.items()}
        if produce_s is not None:
            metrics["rollout/produce_s"] = produce_s
        metrics.update({f"rollout/{k}": float(v) for k, v in report.group_metrics.items()})
        metrics.update({f"rollout/{k}": float(v) for k, v in rollout.items()})
        if rollout.get("mtp/drafted"):  # over the run so far: drafts accepted, tokens per verification
            metrics["rollout/mtp/acceptance"] = rollout["mtp/accepted"] / rollout["mtp/drafted"]
            metrics["rollout/mtp/mean_accepted_length"] = 1 + rollout["mtp/accepted"] / max(rollout["mtp/steps"], 1)
        now = time.monotonic()  # policy tokens the rollouts generated per second since the previous step
        fresh_tokens = rollout.get("policy_tokens", 0.0) - self.totals.get("policy_tokens", 0.0)
        metrics["rollout/tokens_per_s"] = fresh_tokens / max(now - self.last_step_at, 1e-9)
        self.last_step_at = now
        generated = self._generated_rewards(rollout)
        metrics.update({f"rollout/{k}/generated_reward_mean": v for k, v in generated.items()})
        staleness = report.staleness or [0]
        metrics.update({"stream/depth": report.stream_depth, "staleness/mean": float(np.mean(staleness)),
                        "staleness/max": float(max(staleness))})
        for value, count in zip(*np.unique(staleness, return_counts=True), strict=True):
            metrics[f"staleness/count_{int(value)}"] = float(count)
        metrics.update({f"learner/{k}": float(v) for k, v in report.counters.items()})
        self.mlflow.log_metrics(metrics, step=version)
        rewards = "  ".join(f"{name} {v:.2f}" for name, v in sorted(generated.items()))
        line = (f"step {version}/{self.max_steps}  {time.monotonic() - self.start:5.0f}s  reward {rewards}  "
                f"{stats.get('tokens_per_s', 0):.0f} tok/s  staleness {np.mean(staleness):.1f}")
        if self.tty:
            sys.stdout.write("\r\033[K" + line)
            sys.stdout.flush()
            self.last_line = line
        else:
            print(line, flush=True)

    def _generated_rewards(self, rollout: dict[str, float]) -> dict[str, float]:
        """Mean reward per environment of every sample generated since the previous step."""
        out = {}
        for key, total in rollout.items():
            if key.endswith("/samples"):
                name = key.removesuffix("/samples")
                n = total - self.totals.get(key, 0.0)
                if n > 0:
                    out[name] = (rollout[f"{name}/reward_sum"] - self.totals.get(f"{name}/reward_sum", 0.0)) / n
        self.totals = dict(rollout)
        return out

    def evaluation(self, results: dict[str, dict[str, float]], step: int, label: str) -> None:
        self.mlflow.log_metrics({f"eval/{env}/{k}": v for env, r in results.items() for k, v in r.items()
                                 if k not in ("instances", "samples")}, step=step)
        self.mlflow.log_dict(results, f"eval/{label}.json")
        table = "; ".join(f"{env} {eval_summary(r)}" for env, r in results.items())
        self.say(f"eval ({label}, step {step}): {table}")
        if label == "start":  # before RL's minutes are spent: say where it has nothing to sharpen
            for env in rarely_right(results):
                r = results[env]
                self.say(f"eval (start): {env}: {r['pass_at_1'] * r['samples']:.0f} of {r['samples']:.0f} held-out "
                         "samples right; RL sharpens what the policy sometimes does, so expect little rise there "
                         "(README, 'Session 39': a warm start's skills differ by seed and machine)")

    def samples(self, rows: list[dict]) -> None:
        if rows:
            import pandas as pd

            self.mlflow.log_table(pd.DataFrame(rows), "samples.json")

    def comparison(self, start: dict, end: dict, steps: int, seeds: str) -> None:
        """The held-out scores before and after RL, side by side (also in MLflow as `eval/summary.txt`)."""
        lines = [f"held out ({seeds}), step 0 -> step {steps}:", *comparison(start, end)]
        self.mlflow.log_text("\n".join(lines) + "\n", "eval/summary.txt")
        for line in lines:
            self.say(line)

    def summary(self, uri: str, steps: int, checkpoint: str) -> None:
        from estuary.tracking import ui_command

        self.say(f"done: {steps} steps in {time.monotonic() - self.start:.0f}s; checkpoint {checkpoint}")
        self.say(f"MLflow run {self.run.info.run_id}; browse it with: {ui_command(uri)}")
