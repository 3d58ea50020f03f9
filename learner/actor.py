"""The Ray actor around `LearnerWorker`: loads the policy, joins the stream, publishes weights.

    learner = LearnerActor.options(num_cpus=1, max_restarts=-1).remote(spec)
    report = ray.get(learner.step.remote(timeout_s=5))    # a plain dict, or None

A restarted learner resumes from its last checkpoint, and its stream consumer (same name) gets
back the entries it had not acknowledged. Reports carry per-environment rollout metrics
(`learner.metrics.group_metrics`) so the driver never moves trajectories around.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

from configs.schema import LearnerConfig, ModelConfig, StreamConfig


@dataclass
class LearnerSpec:
    learner: LearnerConfig
    model: ModelConfig
    policy_dir: str
    run_dir: str
    redis_url: str
    stream: StreamConfig
    sync_kind: str
    sync_channel: str
    env_staleness: dict[str, int]
    cpus: int = 1


def build_learner(spec: LearnerSpec):
    import torch

    from estuary.run_setup import quiet_libraries

    quiet_libraries()

    from learner.worker import LearnerWorker
    from models.policy import load_policy
    from streams.redis_stream import TrajectoryStream
    from weights_sync.protocol import make_weight_sync

    torch.set_num_threads(max(1, spec.cpus))
    policy = load_policy(spec.policy_dir, dtype=spec.model.dtype)
    stream = TrajectoryStream(spec.redis_url, key=spec.stream.key, consumer="learner-0",
                              max_len=spec.stream.max_len, claim_idle_ms=spec.stream.claim_idle_ms,
                              redeliver_own=True)
    sync = make_weight_sync(spec.sync_kind, spec.sync_channel)
    mtp = spec.model.mtp_loss_coef if getattr(policy.model, "mtp", None) is not None else 0.0
    return LearnerWorker(spec.learner, policy, stream, spec.run_dir, sync=sync,
                         env_staleness=spec.env_staleness, mtp_coef=mtp)


@ray.remote
class LearnerActor:
    def __init__(self, spec: LearnerSpec) -> None:
        self.worker = build_learner(spec)

    def pid(self) -> int:
        import os

        return os.getpid()

    def version(self) -> int:
        return self.worker.version

    def step(self, timeout_s: float) -> dict | None:
        from learner.metrics import group_metrics

        report = self.worker.step(timeout_s=timeout_s)
        if report is None:
            return None
        return {"version": report.version, "stats": report.stats, "staleness": report.staleness,
                "group_ids": [g.group_id for g in report.groups],
                "groups": group_metrics(report.groups), "counters": dict(self.worker.counters),
                "stream_depth": self.worker.stream.depth(), "samples": self._samples(report)}

    def _samples(self, report, per_step: int = 2) -> list[dict]:
        """A few decoded samples per step, for the run's sample table."""
        rows = []
        for group in report.groups[:per_step]:
            s = group.samples[0]
            rows.append({"step": report.version, "env": group.metadata.get("env", group.env_id),
                         "reward": s.reward, "text": self.worker.policy.tokenizer.decode(s.token_ids.tolist())})
        return rows

    def finish(self) -> str:
        return str(self.worker.finish())
