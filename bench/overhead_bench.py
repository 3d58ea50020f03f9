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

The plain loop also runs on one torch thread, its generating and its optimizer step timed apart,
and the machine's busy CPU seconds counted (`/proc/stat`: the sandbox processes that score the
code count too). No schedule on `cores` cores beats that work spread evenly over them (a second
thread inside a phase gains less than a second core does), so plain / (CPU seconds / cores) is
the most any overlap of the phases, asynchronous or not, can give over the plain loop here:
printed as async's ceiling.

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


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (`/proc/stat`: all but idle and
    iowait, and the hypervisor's steal), so that a loop's sandbox processes and every thread count."""
    import os

    # user nice system idle iowait irq softirq steal: steal is the hypervisor's, not ours
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def plain_loop(cfg, policy_dir: Path, steps: int) -> tuple[float, float, float, float]:
    """Per step of generate -> score -> step in one process, after one warm-up step: seconds in
    all, generating and scoring, the optimizer step; and the machine's busy CPU seconds."""
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
    times, generating, cpu = [], [], 0.0
    with ThreadPoolExecutor(max_workers=env.concurrency) as pool:
        for i in range(steps + 1):
            cpu = busy_cpu_s() if i == 1 else cpu
            start, kept = time.perf_counter(), []
            while len(kept) < lc.groups_per_step:  # dynamic sampling, as the learner does
                prompts = [Prompt("code", env.id, make, rng.randrange(10**6), env.timeout_s,
                                  draw_budget(budgets, rng, rc.budget.unbudgeted_fraction))
                           for _ in range(lc.groups_per_step - len(kept))]
                groups = run_groups(engine, policy.tokenizer, prompts, rc.group_size, params, pool, rc.max_len)
                kept += [g for g in groups if len({s.reward for s in g.samples}) > 1]
            generating.append(time.perf_counter() - start)
            batch = [(g.samples, task_and_shaping_advantages(*task_and_shaping(g), lc.advantage)[0].tolist())
                     for g in kept[: lc.groups_per_step]]
            trainer.step(pack_groups(batch, lc.micro_batch_tokens, policy.tokenizer.pad_token_id or 0), objective)
            engine.version += 1
            times.append(time.perf_counter() - start)
    total, generate = sum(times[1:]) / steps, sum(generating[1:]) / steps
    return total, generate, total - generate, (busy_cpu_s() - cpu) / steps


def rollout_workers(cfg, cores: int) -> int:
    """One sync rollout worker per core, but no more than a step has rounds: each worker runs whole
    rounds (`rollout.worker.RolloutWorker.prompts`), so more would generate groups no step uses."""
    rc = cfg.rollout  # as `prompts` and `_draw` bound a round: its slots, each environment's share
    per_round = min(max(1, rc.max_concurrent_episodes // rc.group_size),
                    sum(max(1, env.concurrency // rc.group_size) for env in cfg.environments.values()
                        if env.weight > 0))
    return max(1, min(cores, cfg.learner.groups_per_step // per_round))


def estuary_seconds_per_step(cfg) -> tuple[float, float]:
    """Seconds per step between the end of the first step and the end of the last (the first,
    like the plain loop's, is a warm-up; evaluations and start-up are outside), and the machine's
    busy CPU seconds per step over the same span."""
    from estuary.train import train

    ends: list[tuple[float, float]] = []
    train(cfg, on_step=lambda version, services: ends.append((time.monotonic(), busy_cpu_s())))
    steps = max(len(ends) - 1, 1)
    return (ends[-1][0] - ends[0][0]) / steps, (ends[-1][1] - ends[0][1]) / steps


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
        plain, gen_n, train_n, cpu_n = plain_loop(runs["sync"], policy, args.steps)
        torch.set_num_threads(1)  # the same loop on one core: what each phase costs at one thread
        torch.manual_seed(0)
        plain_1, gen_1, train_1, cpu_1 = plain_loop(runs["sync"], policy, args.steps)
        torch.set_num_threads(cores)
        measured = {name: estuary_seconds_per_step(cfg) for name, cfg in runs.items()}
    seconds = {name: s for name, (s, _cpu) in measured.items()}
    cpu = {name: c for name, (_s, c) in measured.items()}
    sync, asyn = seconds["sync"], seconds["async"]
    # Any schedule spends at least the CPU the work takes when done most efficiently (one torch
    # thread: a second thread inside a phase gains less than a core), spread over every core.
    # Measured for the whole machine: the sandbox processes that score the code count too.
    bound = cpu_1 / cores
    print(f"plain loop, generating + step: {cores} threads {gen_n:.2f} + {train_n:.2f} s, "
          f"1 thread {gen_1:.2f} + {train_1:.2f} s")
    print(f"{'loop':<58} {'s/step':>7} {'steps/h':>8} {'CPU s/step':>11}")
    for name, s, c in ((f"plain ({cores} threads)", plain, cpu_n),
                       ("plain (1 thread)", plain_1, cpu_1),
                       (f"bound: the 1-thread loop's CPU seconds over {cores} cores", bound, cpu_1),
                       (f"estuary sync ({workers} rollout workers, learner {cores} threads)", sync, cpu["sync"]),
                       (f"estuary sync (1 rollout worker, learner {cores} threads)", seconds["sync-w1"],
                        cpu["sync-w1"]),
                       ("estuary sync (1 rollout worker, learner 1 thread)", seconds["sync-1"], cpu["sync-1"]),
                       ("estuary async (1 thread each)", asyn, cpu["async"])):
        print(f"{name:<58} {s:>7.2f} {3600 / s:>8.0f} {c:>11.2f}")
    print(f"RESULT overhead_sync_s_per_step ours={sync:.2f} baseline={plain:.2f} ratio={sync / plain:.2f}")
    print(f"RESULT overhead_async_steps_per_hour ours={3600 / asyn:.0f} baseline={3600 / plain:.0f} "
          f"ratio={plain / asyn:.2f}")
    print(f"async's ceiling on this machine: plain / bound = {plain / bound:.2f} (target 1.5)")


if __name__ == "__main__":
    main()
