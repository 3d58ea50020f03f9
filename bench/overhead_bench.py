"""What the machinery costs: `estuary train` (sync and async) against a plain single-process GRPO loop.

    .venv/bin/python -m bench.overhead_bench [--steps 12] [--policy DIR]

The same work for every loop: the code environment only, `learner.groups_per_step` (8) groups of
8 samples per optimizer step, each group with differing rewards (groups with equal rewards are
generated, then dropped, by both), the quick start's policy, sampling, budgets and objective
(`learner.worker.objective_from`). The plain loop is one process, no Ray, no Redis, no
DeepSpeed: the torch engine generates the groups (lockstep rounds, `rollout.episodes`), the
environment scores them on a thread pool, and a plain-torch `Trainer` steps the same model the
engine decodes with (no weight sync: they share the weights). Like `estuary train`, it drafts with
the MTP heads (`model.mtp_steps`, `draft_max_batch`, `draft_dtype`) and trains them
(`model.mtp_loss_coef`); until session 26 it did neither, about 0.17 s a step of work
`estuary train` did and the baseline did not. Time per step is measured after
one warm-up step, and `estuary train`'s between its first step's end and its last's.

The plain loop's torch uses every core in each phase. So does `run.mode=sync` with one rollout
worker per core (`rollout.num_workers`, each generating its share of the step's groups on one
thread; at most as many workers as the step has rounds, since a worker runs whole rounds) and
`learner.threads` set to the core count: in sync mode the rollouts idle while the learner steps
and the learner idles while they generate (Ray's CPU count is raised to cover the workers and
the learner, which never run at once). The table also shows sync with one
rollout worker, at the core count's learner threads and at one (the default). Asynchronous
runs keep one thread each for the learner and one rollout worker.

Prints a table, then `RESULT overhead_sync_s_per_step ours=<sync> baseline=<plain> ratio=<sync/plain>`
(target <= 1.15) and `RESULT overhead_async_steps_per_hour ours=<async> baseline=<plain>
ratio=<async/plain>` (target >= 1.5).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

CODE_ONLY = ["eval.instances=1", "eval.every_steps=0", "eval.budgets=[]", "eval.environments=[code]",
             "run.time_budget_s=0", "sft.steps=0"]


def config(policy: Path, steps: int, overrides: list[str]):
    from configs import load_config

    cfg = load_config("tiny_cpu", [f"model.path={policy}", f"run.max_steps={steps}", *CODE_ONLY, *overrides])
    cfg.environments = {"code": cfg.environments["code"]}  # the same work: code only
    return cfg


def plain_loop(cfg, policy_dir: Path, steps: int) -> float:
    """Seconds per step of generate -> score -> step in one process, after one warm-up step."""
    from environments import env_factory
    from learner.advantages import task_and_shaping_advantages
    from learner.batching import pack_groups
    from learner.trainer import Trainer, TrainerOptions
    from learner.worker import objective_from, task_and_shaping
    from models.policy import load_policy
    from rollout.budget import draw_budget
    from rollout.episodes import Prompt, run_groups
    from rollout.torch_engine import TorchEngine
    from rollout.worker import budget_range, sampling_params

    policy, lc, rc, env = load_policy(policy_dir), cfg.learner, cfg.rollout, cfg.environments["code"]
    mc = cfg.model  # drafts as the rollout actors make them, MTP heads trained as the learner trains them
    engine = TorchEngine(policy, max_batch=rc.max_concurrent_episodes, max_len=rc.max_len, seed=0,
                         mtp_steps=mc.mtp_steps, draft_max_batch=mc.draft_max_batch, draft_dtype=mc.draft_dtype)
    trainer = Trainer(policy.model, TrainerOptions(backend="torch", lr=lc.lr, warmup_steps=lc.warmup_steps,
                                                   keep_reference=lc.kl_coef > 0))
    mtp_coef = mc.mtp_loss_coef if getattr(policy.model, "mtp", None) is not None else 0.0
    objective = objective_from(lc, mtp_coef, temperature=rc.sampling.temperature, top_p=rc.sampling.top_p)
    make, params, budgets, rng = env_factory(env), sampling_params(rc), budget_range(rc.budget), random.Random(0)
    times = []
    with ThreadPoolExecutor(max_workers=env.concurrency) as pool:
        for _ in range(steps + 1):
            start, kept = time.perf_counter(), []
            while len(kept) < lc.groups_per_step:  # dynamic sampling, as the learner does
                prompts = [Prompt("code", env.id, make, rng.randrange(10**6), env.timeout_s,
                                  draw_budget(budgets, rng, rc.budget.unbudgeted_fraction))
                           for _ in range(lc.groups_per_step - len(kept))]
                groups = run_groups(engine, policy.tokenizer, prompts, rc.group_size, params, pool, rc.max_len)
                kept += [g for g in groups if len({s.reward for s in g.samples}) > 1]
            batch = [(g.samples, task_and_shaping_advantages(*task_and_shaping(g), lc.advantage)[0].tolist())
                     for g in kept[: lc.groups_per_step]]
            trainer.step(pack_groups(batch, lc.micro_batch_tokens, policy.tokenizer.pad_token_id or 0), objective)
            engine.version += 1
            times.append(time.perf_counter() - start)
    return sum(times[1:]) / steps


def rollout_workers(cfg, cores: int) -> int:
    """One sync rollout worker per core, but no more than a step has rounds: each worker runs whole
    rounds (`rollout.worker.RolloutWorker.prompts`), so more would generate groups no step uses."""
    rc = cfg.rollout  # as `prompts` and `_draw` bound a round: its slots, each environment's share
    per_round = min(max(1, rc.max_concurrent_episodes // rc.group_size),
                    sum(max(1, env.concurrency // rc.group_size) for env in cfg.environments.values()
                        if env.weight > 0))
    return max(1, min(cores, cfg.learner.groups_per_step // per_round))


def estuary_seconds_per_step(cfg) -> float:
    """Seconds per step between the end of the first step and the end of the last (the first,
    like the plain loop's, is a warm-up; evaluations and start-up are outside)."""
    from estuary.train import train

    ends: list[float] = []
    train(cfg, on_step=lambda version, services: ends.append(time.monotonic()))
    return (ends[-1] - ends[0]) / max(len(ends) - 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps (after one warm-up step)")
    parser.add_argument("--policy", default=None, help="starting policy (default: the quick start's warm start)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        policy = Path(args.policy) if args.policy else None
        if policy is None:
            from bench.draft_round_bench import warm_start_policy

            policy = warm_start_policy(Path(out))
        cores = torch.get_num_threads()  # what the plain loop's torch uses
        workers = rollout_workers(config(policy, args.steps + 1, []), cores)
        spread = [f"rollout.num_workers={workers}", f"services.ray.num_cpus={workers + 1}"]
        runs = {name: config(policy, args.steps + 1, [f"run.output_dir={out}", f"run.name=overhead-{name}",
                                                   f"run.mode={mode}", f"learner.threads={threads}", *extra])
                for name, mode, threads, extra in (("sync", "sync", cores, spread), ("sync-w1", "sync", cores, []),
                                                   ("sync-1", "sync", 1, []), ("async", "async", 0, []))}
        torch.manual_seed(0)
        plain = plain_loop(runs["sync"], policy, args.steps)
        seconds = {name: estuary_seconds_per_step(cfg) for name, cfg in runs.items()}
    sync, asyn = seconds["sync"], seconds["async"]
    print(f"{'loop':<52} {'s/step':>8} {'steps/h':>9}")
    for name, s in ((f"plain ({cores} threads)", plain),
                    (f"estuary sync ({workers} rollout workers, learner {cores} threads)", sync),
                    (f"estuary sync (1 rollout worker, learner {cores} threads)", seconds["sync-w1"]),
                    ("estuary sync (1 rollout worker, learner 1 thread)", seconds["sync-1"]),
                    ("estuary async (1 thread each)", asyn)):
        print(f"{name:<52} {s:>8.2f} {3600 / s:>9.0f}")
    print(f"RESULT overhead_sync_s_per_step ours={sync:.2f} baseline={plain:.2f} ratio={sync / plain:.2f}")
    print(f"RESULT overhead_async_steps_per_hour ours={3600 / asyn:.0f} baseline={3600 / plain:.0f} "
          f"ratio={plain / asyn:.2f}")


if __name__ == "__main__":
    main()
