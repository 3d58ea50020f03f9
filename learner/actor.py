"""The Ray actor around `LearnerWorker`: loads the policy, joins the stream, publishes weights.

    learner = LearnerActor.options(num_cpus=1, max_restarts=-1).remote(spec)
    report = ray.get(learner.step.remote(timeout_s=5))    # a summarised StepReport, or None

A restarted learner resumes from its last checkpoint, and its stream consumer (same name) gets
back the entries it had not acknowledged. Reports carry per-environment rollout metrics
(`learner.metrics.group_metrics`) so the driver never moves trajectories around.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import ray

from configs.runtime import SyncChannel
from configs.schema import LearnerConfig, ModelConfig, SamplingConfig, StreamConfig
from learner.reference_kl import ReferenceSource

if TYPE_CHECKING:
    from learner.worker import StepReport


@dataclass
class LearnerSpec:
    learner: LearnerConfig
    model: ModelConfig
    policy_dir: str
    run_dir: str
    redis_url: str
    stream: StreamConfig
    sync: SyncChannel
    env_staleness: dict[str, int]
    sampling: SamplingConfig
    """The rollout's sampler settings (`rollout.sampling`): the learner's log-probs use the same."""
    env_kl_coef: dict[str, float] = field(default_factory=dict)
    """Per-environment overrides of `learner.kl_coef` (`environments.<name>.kl_coef`), by env id."""
    env_overlong_filter: dict[str, bool] = field(default_factory=dict)
    """Per-environment overrides of `learner.overlong_filter`, by env id."""
    env_reference_kl_coef: dict[str, float] = field(default_factory=dict)
    """Per-environment overrides of `learner.reference_kl_coef`, by env id."""
    reference: ReferenceSource | None = None
    """Where `learner.reference_kl_coef`'s reference conversations come from (None: off)."""
    cpus: int = 1
    """Torch threads of this learner (`learner.threads`, else its placement bundle's CPUs)."""
    rank: int = 0
    """This learner's rank in the data-parallel group."""
    world_size: int = 1
    """Learner ranks in the group (`learner.num_learners`)."""
    master: str = ""
    """`host:port` of rank 0's torch.distributed rendezvous (several ranks only)."""


def build_learner(spec: LearnerSpec):
    import torch

    from configs.runtime import quiet_libraries

    quiet_libraries()

    from learner.worker import LearnerWorker
    from models.policy import load_policy
    from streams.redis_stream import TrajectoryStream

    torch.set_num_threads(max(1, spec.cpus))
    if spec.world_size > 1:  # the rendezvous LearnerWorker's trainer joins (read by deepspeed)
        import os

        host, port = spec.master.rsplit(":", 1)
        os.environ.update(MASTER_ADDR=host, MASTER_PORT=port, RANK=str(spec.rank),
                          WORLD_SIZE=str(spec.world_size), LOCAL_RANK="0")  # Ray shows each rank its own GPU
    policy = load_policy(spec.policy_dir, dtype=spec.model.dtype)
    # Rank 0 reads the stream and publishes; the other ranks get their share from it.
    stream = sync = None
    if spec.rank == 0:
        stream = TrajectoryStream(spec.redis_url, key=spec.stream.key, consumer="learner-0",
                                  max_len=spec.stream.max_len, claim_idle_ms=spec.stream.claim_idle_ms,
                                  redeliver_own=True)
        sync = spec.sync.open(rank=0, device="cuda" if torch.cuda.is_available() else "cpu")
    mtp = spec.model.mtp_loss_coef if getattr(policy.model, "mtp", None) is not None else 0.0
    return LearnerWorker(spec.learner, policy, stream, spec.run_dir, sync=sync,
                         env_staleness=spec.env_staleness, mtp_coef=mtp, mtp_steps=max(1, spec.model.mtp_steps),
                         temperature=spec.sampling.temperature,
                         top_p=spec.sampling.top_p, top_k=spec.sampling.top_k, env_kl_coef=spec.env_kl_coef,
                         env_overlong_filter=spec.env_overlong_filter,
                         env_reference_kl_coef=spec.env_reference_kl_coef,
                         reference_rows=spec.reference.rows(policy.tokenizer) if spec.reference else None)


@ray.remote
class LearnerActor:
    def __init__(self, spec: LearnerSpec) -> None:
        self.worker = build_learner(spec)

    def pid(self) -> int:
        import os

        return os.getpid()

    def version(self) -> int:
        return self.worker.version

    def node(self) -> str:
        """The Ray node this actor runs on (where the placement put it)."""
        return ray.get_runtime_context().get_node_id()

    def step(self, timeout_s: float, progress: float | None = None) -> StepReport | None:
        """One step, summarised for the driver: metrics and a few samples instead of the groups
        (every rank must be called; rank 0's report covers the whole step, the others' None)."""
        from dataclasses import replace

        from learner.metrics import group_metrics

        report = self.worker.step(timeout_s=timeout_s, progress=progress)
        if report is None or self.worker.stream is None:
            return None
        return replace(report, groups=[], group_metrics=group_metrics(report.groups),
                       counters=dict(self.worker.counters), stream_depth=self.worker.stream.depth(),
                       samples=self._samples(report))

    def _samples(self, report, per_step: int = 2) -> list[dict]:
        """A few decoded samples per step, for the run's sample table."""
        rows = []
        for group in report.groups[:per_step]:
            s = group.samples[0]
            rows.append({"step": report.version, "env": group.metadata.get("env", group.env_id),
                         "reward": s.reward, "text": self.worker.policy.tokenizer.decode(s.token_ids.tolist())})
        return rows

    def weights(self, averaged: bool = False) -> dict | None:
        """The whole model's weights on rank 0 (None on the others; every rank must be called under
        ZeRO-3): the driver's evaluation copy when the engines get theirs by broadcast, or with
        `averaged` the weight average that is the run's final policy (`learner.ema_decay`)."""
        trainer = self.worker.trainer
        state = trainer.averaged_state_dict() if averaged else trainer.full_state_dict()
        return None if state is None else {k: v.detach().cpu() for k, v in state.items()}

    def finish(self) -> str:
        return str(self.worker.finish())


@ray.remote(num_cpus=0)
def rendezvous_address() -> str:
    """`host:port` for rank 0's torch.distributed store, found on the node rank 0 is placed on."""
    from streams.redis_server import free_port

    return f"{ray.util.get_node_ip_address()}:{free_port()}"
