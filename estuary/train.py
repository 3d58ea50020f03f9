"""`estuary train CONFIG [key=value ...]`: one asynchronous multi-environment GRPO run.

    estuary train configs/tiny_cpu.yaml                       # everything embedded, on a laptop
    ray job submit --working-dir . -- estuary train configs/tiny_cpu.yaml    # the same, on a cluster

The loop: rollout actors generate across the environments and stream trajectory groups into
Redis; the learner actor consumes them, steps, publishes weights and checkpoints; this driver
logs each step to MLflow, evaluates on held-out seeds every `eval.every_steps`, and stops at
`run.max_steps` or `run.time_budget_s`. `run.mode: sync` runs the same parts generate-then-train.
Actors restart after a crash (the learner from its last checkpoint); a retried call simply runs
again on the restarted actor.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from configs.schema import Config


@dataclass
class TrainResult:
    run_id: str
    steps: int
    checkpoint: str
    evals: dict[str, dict[str, dict[str, float]]]
    seconds: float
    trained_groups: dict[int, list[str]]  # the group ids each policy version was trained on
    timeline: list[tuple[float, int, dict[str, float]]]
    """Per evaluation: (seconds since start, version, unbudgeted eval reward per environment)."""


def train(cfg: Config, on_step=None) -> TrainResult:
    """Run to `max_steps` or the time budget; `on_step(version, services)` is called after each step."""
    import mlflow
    import ray

    from configs.loader import to_yaml
    from configs.runtime import quiet_libraries
    from estuary import run_setup as setup
    from estuary.evaluate import evaluate
    from estuary.plan import plan_run
    from estuary.run_log import RunLog
    from estuary.services import Services
    from estuary.start_eval import start_evaluation
    from models.policy import load_policy

    quiet_libraries()
    setup.check_run_config(cfg)
    plan_run(cfg)  # refuses a placement or memory plan that cannot fit before anything starts
    run_dir, started = setup.run_dir_of(cfg), time.monotonic()
    with (Services(cfg.services, run_dir) as svc, setup.weight_channel(cfg, run_dir) as channel,
          # the machine's CPU, memory and disk beside the run's metrics (MLflow's system metrics)
          mlflow.start_run(run_name=cfg.run.name, log_system_metrics=True) as run):
        log = RunLog(run, to_yaml(cfg), asdict(cfg), run_dir, cfg.run.max_steps)
        policy_dir = setup.prepare_policy(cfg, run_dir, log.say)
        learner, workers = setup.start_actors(cfg, run_dir, policy_dir, svc.redis_url, channel)
        evaluator, timeline = load_policy(policy_dir, dtype=cfg.model.dtype), []

        def held_out(version: int, label: str) -> dict:
            def compute() -> dict:
                return evaluate(evaluator, cfg.environments, cfg.eval, cfg.rollout, cfg.run.seed,
                                only=cfg.eval.environments or None)

            # the warm start's scores are a function of its weights: a re-run reuses them
            results = start_evaluation(cfg, policy_dir, compute, log.say) if label == "start" else compute()
            log.evaluation(results, version, label)
            timeline.append((time.monotonic() - started, version, _rewards(results)))
            return results

        evals = {"start": held_out(0, "start")}
        version = learner.version()
        rl_started = time.monotonic()  # the time budget is RL's: a cached warm start must not buy steps
        running = [w.run.remote() for w in workers] if cfg.run.mode == "async" else []
        per_worker = -(-cfg.learner.groups_per_step // len(workers))
        samples: list[dict] = []
        trained: dict[int, list[str]] = {}
        produce_s = 0.0  # sync: the step's time generating, before the learner may start
        while version < cfg.run.max_steps and not _out_of_time(cfg, rl_started):
            if cfg.run.mode == "sync":
                produce_s += _produce(ray, workers, per_worker)
            # sync: the groups are in the stream once produce() returns, so the learner never
            # waits; too few usable ones and the loop produces more at once (it waited 1 s).
            report = learner.step(timeout_s=5.0 if cfg.run.mode == "async" else 0.0,
                                  progress=_progress(cfg, version, rl_started))
            if report is None:
                continue
            version = report.version
            log.step(report, _rollout_counters(ray, workers), produce_s if cfg.run.mode == "sync" else None)
            produce_s = 0.0
            samples += report.samples
            trained[version] = report.group_ids  # a restarted learner re-trains lost steps: last word wins
            if on_step is not None:
                on_step(version, svc)
            if cfg.eval.every_steps and version % cfg.eval.every_steps == 0 and version < cfg.run.max_steps:
                _pull_newest(cfg, run_dir, evaluator, learner)
                held_out(version, f"step-{version}")
        ray.get([w.stop.remote() for w in workers])
        ray.get(running)
        checkpoint = _finish_learner(cfg, run_dir, learner, evaluator, log.say)
        evals["end"] = held_out(version, "end")
        log.comparison(evals["start"], evals["end"], version, _eval_header(cfg))
        log.samples(samples)
        mlflow.log_param("final_checkpoint", checkpoint)
        log.summary(svc.mlflow_uri, version, checkpoint)
        return TrainResult(run.info.run_id, version, checkpoint, evals, time.monotonic() - started, trained, timeline)


def _produce(ray, workers, per_worker: int) -> float:
    """Sync mode: every rollout worker publishes `per_worker` more groups; returns the seconds taken."""
    started = time.monotonic()
    ray.get([w.produce.remote(per_worker) for w in workers])
    return time.monotonic() - started


def _finish_learner(cfg: Config, run_dir, learner, evaluator, say) -> str:
    """The learner's final checkpoint, with the evaluation copy holding the final policy: the newest
    weights, or with `learner.ema_decay` their average (also saved under `final_policy/`)."""
    import mlflow

    checkpoint = learner.finish()
    if cfg.learner.ema_decay:  # the final policy is the weight average, not the last step's weights
        averaged = learner.weights(averaged=True)
        load_published(evaluator.model, averaged)
        final = evaluator.save(run_dir / "final_policy", averaged)
        mlflow.log_param("final_policy", str(final))
        say(f"final policy: the weight average (learner.ema_decay={cfg.learner.ema_decay:g}) at {final}")
    else:
        _pull_newest(cfg, run_dir, evaluator, learner)
    learner.close()
    return checkpoint


def _eval_header(cfg: Config) -> str:
    first, n = cfg.eval.seed_offset, cfg.eval.instances
    return (f"seeds {first:,}-{first + n - 1:,}: {n} instances per environment x "
            f"{cfg.eval.samples_per_instance} at T={cfg.rollout.sampling.temperature:g}")


def _rewards(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each environment's unbudgeted eval reward."""
    return {name: r["reward"] for name, r in results.items() if ":budget" not in name}


def _progress(cfg: Config, version: int, started: float) -> float:
    """How far RL is towards its end: steps of `max_steps` or time of `time_budget_s`, the nearer."""
    by_time = (time.monotonic() - started) / cfg.run.time_budget_s if cfg.run.time_budget_s else 0.0
    return min(1.0, max(version / cfg.run.max_steps, by_time))


def _out_of_time(cfg: Config, started: float) -> bool:
    return bool(cfg.run.time_budget_s) and time.monotonic() - started > cfg.run.time_budget_s


def _rollout_counters(ray, workers) -> dict[str, float]:
    return merge_counters(ray.get([w.counters.remote() for w in workers]))


def merge_counters(per_worker: list[dict[str, float]]) -> dict[str, float]:
    """The workers' counters summed, but for a crossover (a batch size) and a draft depth per batch
    bucket (`mtp/depth_b<k>`): the largest any worker chose."""
    totals: dict[str, float] = {}
    for counters in per_worker:
        for key, value in counters.items():
            largest = key.endswith("crossover") or key.startswith("mtp/depth_b")
            totals[key] = max(totals.get(key, 0), value) if largest else totals.get(key, 0) + value
    return totals


def _pull_newest(cfg: Config, run_dir, policy, learner=None) -> None:
    """Bring the evaluation copy of the policy up to the newest published weights. With `collective`
    the broadcast reaches only the engines, so the learner group hands over its weights instead."""
    if cfg.weights_sync.transport == "collective":
        load_published(policy.model, learner.weights())
        return
    from configs.runtime import sync_channel

    sync = sync_channel(cfg, run_dir).open()
    try:
        update = sync.pull(newer_than=-1)
        if update is not None:
            load_published(policy.model, update.weights)
    finally:
        sync.close()  # a reader's close drops its mappings only


class WeightMismatch(RuntimeError):
    """A published version does not cover the evaluation model's weights (or has others)."""


def load_published(model, weights: dict) -> None:
    """Load a published version into the evaluation model; refuse one that leaves any policy weight
    untouched or names weights the model lacks (evaluating a half-updated model reports nonsense).

    MTP heads (`mtp.*`) are optional on both sides: evaluation never drafts, so heads the model
    lacks are skipped and heads the version lacks keep their values; heads both hold are loaded.
    """
    own = model.state_dict()
    policy = {k for k in own if not k.startswith("mtp.")}
    given = {k for k in weights if not k.startswith("mtp.")}
    missing, unknown = sorted(policy - given), sorted(given - policy)
    if missing or unknown:
        raise WeightMismatch(f"the published weights do not match the evaluation model: {len(missing)} policy "
                             f"weights missing (e.g. {missing[:3]}), {len(unknown)} unknown (e.g. {unknown[:3]})")
    model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
