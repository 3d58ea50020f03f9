"""What `estuary train` prepares before the loop: the run folder, the starting policy, the actor specs.

The starting policy is `model.path`, or the tiny `model.preset` written (seeded) to
`<run>/policy`; then, with `sft.steps`, a warm-start SFT on the environments' reference answers
(`learner.sft`), and, when `model.mtp_steps` asks for drafts and the policy has no MTP heads,
the heads are fitted (`estuary model train-mtp`) on the policy's own generations. A run folder that
already holds a policy (a restarted run) reuses it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from configs.schema import Config
from learner.actor import LearnerSpec
from rollout.actor import RolloutSpec


def quiet_libraries() -> None:
    """Progress bars of weight loading and saving say nothing a run's log needs (every process)."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run.output_dir).resolve() / cfg.run.name


def prepare_policy(cfg: Config, run_dir: Path, say=print) -> Path:
    from models.mtp import MTP_FILE

    target = run_dir / "policy"
    if not (target / "config.json").is_file():
        tmp = run_dir / "policy.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if cfg.model.path:
            shutil.copytree(cfg.model.path, tmp)
            say(f"policy: {cfg.model.path}")
        else:
            from models.policy import write_preset

            write_preset(cfg.model.preset, tmp, seed=cfg.run.seed)
            say(f"policy: tiny preset {cfg.model.preset} (seed {cfg.run.seed})")
        if cfg.sft.steps:
            from learner.sft import run_sft

            result = run_sft(tmp, cfg.sft, cfg.environments, seed=cfg.run.seed, seed_limit=cfg.eval.seed_offset)
            say(f"sft: {cfg.sft.steps} steps on {result.examples} reference conversations, "
                f"loss {result.loss_start:.2f} -> {result.loss_end:.2f} in {result.seconds:.0f}s")
        if cfg.model.mtp_steps and not (tmp / MTP_FILE).is_file():
            from models.train_mtp import train_mtp

            env_ids = [(env.id, dict(env.kwargs)) for env in cfg.environments.values()]
            result = train_mtp(tmp, env_ids=env_ids, samples=128, steps=100, seed=cfg.run.seed)
            say(f"mtp heads: loss {result.loss_start:.2f} -> {result.loss_end:.2f} in {result.seconds:.0f}s")
        tmp.rename(target)
    return target


def sync_channel(cfg: Config, run_dir: Path) -> str:
    return str(run_dir / "weights") if cfg.weights_sync.transport == "local" else cfg.run.name


def check_run_config(cfg: Config) -> None:
    """What `estuary train` cannot run, refused before any service starts or any SFT is paid."""
    from configs.errors import ConfigError

    if cfg.weights_sync.transport == "collective":
        raise ConfigError("weights_sync.transport=collective needs a fixed group of engines; `estuary train` "
                          "uses `local` (one machine) or `ray` (a cluster): set weights_sync.transport=ray")
    if cfg.learner.num_learners != 1:
        # LearnerWorker runs data-parallel under a torch.distributed launcher (WORLD_SIZE > 1),
        # but the driver starts one learner actor: say so instead of silently using one.
        raise ConfigError(f"learner.num_learners={cfg.learner.num_learners}: `estuary train` starts one learner "
                          "actor so far; set learner.num_learners=1 (data-parallel learners run LearnerWorker "
                          "under torchrun or the deepspeed launcher)")
    # The stream must hold what the learner trains on between two checkpoints, or producers and
    # the learner wait on each other forever.
    held = cfg.learner.groups_per_step * max(1, cfg.learner.checkpoint_every)
    if cfg.stream.max_len < 2 * held:
        raise ConfigError(
            f"stream.max_len={cfg.stream.max_len} is too small: the learner holds up to {held} unacknowledged "
            f"groups between checkpoints (groups_per_step x checkpoint_every); set stream.max_len >= {2 * held} "
            "or checkpoint more often")


def learner_spec(cfg: Config, run_dir: Path, policy_dir: Path, redis_url: str) -> LearnerSpec:
    staleness = {env.id: env.max_staleness for env in cfg.environments.values() if env.max_staleness is not None}
    return LearnerSpec(cfg.learner, cfg.model, str(policy_dir), str(run_dir), redis_url, cfg.stream,
                       cfg.weights_sync.transport, sync_channel(cfg, run_dir), staleness)


def rollout_specs(cfg: Config, run_dir: Path, policy_dir: Path, redis_url: str) -> list[RolloutSpec]:
    return [RolloutSpec(cfg.rollout, cfg.environments, cfg.model, str(policy_dir), redis_url, cfg.stream,
                        cfg.weights_sync.transport, sync_channel(cfg, run_dir), cfg.run.seed, index=i,
                        routing=cfg.learner.routing_replay, seed_limit=cfg.eval.seed_offset)
            for i in range(cfg.rollout.num_workers)]


def start_actors(cfg: Config, run_dir: Path, policy_dir: Path, redis_url: str):
    """The learner actor and the rollout actors, named after the run, restarted after a crash.

    `max_task_retries=-1` makes a call that was running when its actor died run again on the
    restarted actor, so the driver's loop never sees the crash.
    """
    from learner.actor import LearnerActor
    from rollout.actor import RolloutActor

    learner = LearnerActor.options(
        name=f"{cfg.run.name}:learner", num_cpus=1, num_gpus=cfg.learner.gpus_per_learner, max_restarts=-1,
        max_task_retries=-1).remote(learner_spec(cfg, run_dir, policy_dir, redis_url))
    workers = [RolloutActor.options(
        name=f"{cfg.run.name}:rollout-{spec.index}", num_cpus=cfg.rollout.cpus_per_worker,
        num_gpus=cfg.rollout.gpus_per_worker, max_restarts=-1, max_task_retries=-1).remote(spec)
        for spec in rollout_specs(cfg, run_dir, policy_dir, redis_url)]
    return learner, workers
