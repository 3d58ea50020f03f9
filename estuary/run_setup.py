"""What `estuary train` prepares before the loop: the run folder, the starting policy, the actor specs.

The starting policy is `model.path`, or the tiny `model.preset` written (seeded) to
`<run>/policy`, warm-started and given MTP heads by `estuary.warm_start` (cached across runs). A
run folder that already holds a policy (a restarted run) reuses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from configs.runtime import SyncChannel, sync_channel
from configs.schema import Config
from learner.actor import LearnerSpec
from learner.reference_kl import ReferenceSource
from rollout.actor import RolloutSpec


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run.output_dir).resolve() / cfg.run.name


def prepare_policy(cfg: Config, run_dir: Path, say=print) -> Path:
    """The run's starting policy under `<run>/policy` (`estuary.warm_start`: built once, then cached)."""
    from estuary.warm_start import warm_start

    return warm_start(cfg, run_dir / "policy", say)


def check_run_config(cfg: Config) -> None:
    """What `estuary train` cannot run, refused before any service starts or any SFT is paid."""
    from configs.errors import ConfigError

    if cfg.learner.num_learners > 1 and cfg.learner.backend != "deepspeed":
        raise ConfigError(f"learner.num_learners={cfg.learner.num_learners} needs learner.backend=deepspeed "
                          "(the torch backend is one process)")
    # The stream must hold what the learner trains on between two checkpoints, or producers and
    # the learner wait on each other forever.
    held = cfg.learner.groups_per_step * max(1, cfg.learner.checkpoint_every)
    if cfg.stream.max_len < 2 * held:
        raise ConfigError(
            f"stream.max_len={cfg.stream.max_len} is too small: the learner holds up to {held} unacknowledged "
            f"groups between checkpoints (groups_per_step x checkpoint_every); set stream.max_len >= {2 * held} "
            "or checkpoint more often")
    if not any(env.weight > 0 for env in cfg.environments.values()):
        raise ConfigError("every environment has weight 0: RL would draw no prompt; give one a weight > 0")
    from estuary.warm_start import sft_environments

    if cfg.sft.steps and not any(env.weight > 0 for env in sft_environments(cfg).values()):
        raise ConfigError(f"sft.steps={cfg.sft.steps} but every environment's sft_weight is 0: the warm start "
                          "would have no reference conversation; give one an sft_weight > 0 (or set sft.steps=0)")
    if cfg.learner.reference_kl_coef > 0 and reference_source(cfg) is None:
        raise ConfigError(f"learner.reference_kl_coef={cfg.learner.reference_kl_coef} but no environment with a "
                          "weight > 0 keeps a reference_kl_coef > 0: the term would have no reference answers; "
                          "set learner.reference_kl_coef=0 or give an environment a coefficient")
    unknown = sorted(set(cfg.eval.environments) - set(cfg.environments))
    if unknown:
        raise ConfigError(f"eval.environments names {unknown}, which are not under environments; "
                          f"choose from {sorted(cfg.environments)} (or [] for every one)")
    # A sync round publishes its groups before the learner reads any: a smaller bound never fills it.
    if 0 < cfg.stream.max_unread < cfg.learner.groups_per_step:
        raise ConfigError(f"stream.max_unread={cfg.stream.max_unread} is below learner.groups_per_step="
                          f"{cfg.learner.groups_per_step}: producers would wait on a learner that waits on them; "
                          f"set it >= {cfg.learner.groups_per_step} (or 0 for no bound)")


@contextmanager
def weight_channel(cfg: Config, run_dir: Path) -> Iterator[SyncChannel]:
    """The run's weight-sync channel. For `collective` the driver hosts the group's rendezvous
    store for the whole run: it must outlive the learner and every engine, which restart."""
    if cfg.weights_sync.transport == "local":
        from weights_sync.local import remove_channel

        channel = sync_channel(cfg, run_dir)
        remove_channel(channel.address)  # a previous run's segments in this folder (see there)
        try:
            yield channel
        finally:
            remove_channel(channel.address)
        return
    if cfg.weights_sync.transport != "collective":
        yield sync_channel(cfg, run_dir)
        return
    import ray

    from weights_sync.membership import host_rendezvous

    store, address = host_rendezvous(ray.util.get_node_ip_address(), cfg.weights_sync.collective_port)
    try:
        yield sync_channel(cfg, run_dir, address)
    finally:
        del store  # its server stops with it


def learner_spec(cfg: Config, run_dir: Path, policy_dir: Path, redis_url: str, channel: SyncChannel) -> LearnerSpec:
    staleness = {env.id: env.max_staleness for env in cfg.environments.values() if env.max_staleness is not None}
    kl = {env.id: env.kl_coef for env in cfg.environments.values() if env.kl_coef is not None}
    overlong = {env.id: env.overlong_filter for env in cfg.environments.values() if env.overlong_filter is not None}
    anchor = {env.id: env.reference_kl_coef for env in cfg.environments.values() if env.reference_kl_coef is not None}
    return LearnerSpec(cfg.learner, cfg.model, str(policy_dir), str(run_dir), redis_url, cfg.stream,
                       channel, staleness, cfg.rollout.sampling, env_kl_coef=kl, env_overlong_filter=overlong,
                       env_reference_kl_coef=anchor, reference=reference_source(cfg))


# Reference conversations in `learner.reference_kl_coef`'s pool, per environment: a step draws a
# few (`reference_kl_rows`), so each is seen several times over a quick start's ~250 steps.
REFERENCE_POOL = 64


def reference_source(cfg: Config) -> ReferenceSource | None:
    """The pool for `learner.reference_kl_coef` (None when off): the environments RL draws from
    whose coefficient (`environments.<name>.reference_kl_coef`, else the learner's) is > 0;
    budgets and cuts as the warm start's SFT showed them."""
    def coef(env) -> float:
        return cfg.learner.reference_kl_coef if env.reference_kl_coef is None else env.reference_kl_coef

    envs = {name: env for name, env in cfg.environments.items() if env.weight > 0 and coef(env) > 0}
    if not envs:
        return None
    from rollout.worker import budget_range

    return ReferenceSource(envs, REFERENCE_POOL, cfg.run.seed, cfg.eval.seed_offset, cfg.sft.cut_fraction,
                           budget_range(cfg.rollout.budget), cfg.rollout.budget.unbudgeted_fraction)


def rollout_specs(cfg: Config, policy_dir: Path, redis_url: str, channel: SyncChannel) -> list[RolloutSpec]:
    return [RolloutSpec(cfg.rollout, cfg.environments, cfg.model, str(policy_dir), redis_url, cfg.stream,
                        channel, cfg.run.seed, index=i,
                        routing=cfg.learner.routing_replay, seed_limit=cfg.eval.seed_offset)
            for i in range(cfg.rollout.num_workers)]


def start_actors(cfg: Config, run_dir: Path, policy_dir: Path, redis_url: str, channel: SyncChannel):
    """The learner group (`estuary.learner_group`) and the rollout actors, named after the run.

    Rollout actors (and a single learner) are restarted after a crash: `max_task_retries=-1`
    makes a call that was running when its actor died run again on the restarted actor, so the
    driver's loop never sees the crash (a learner group restarts itself as a whole).
    """
    from estuary.learner_group import LearnerGroup
    from rollout.actor import RolloutActor

    learner = LearnerGroup.start(cfg, learner_spec(cfg, run_dir, policy_dir, redis_url, channel))
    spread = {"scheduling_strategy": "SPREAD"} if cfg.rollout.placement == "SPREAD" else {}
    workers = [RolloutActor.options(
        name=f"{cfg.run.name}:rollout-{spec.index}", num_cpus=cfg.rollout.cpus_per_worker,
        num_gpus=cfg.rollout.gpus_per_worker, max_restarts=-1, max_task_retries=-1, **spread).remote(spec)
        for spec in rollout_specs(cfg, policy_dir, redis_url, channel)]
    return learner, workers
