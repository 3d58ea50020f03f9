"""The driver's handle on the learners: one actor, or N ranks in a Ray placement group.

    learners = LearnerGroup.start(cfg, spec)     # N = learner.num_learners
    version = learners.version()                 # every rank agrees, or it is an error
    report = learners.step(timeout_s=5)          # every rank steps; rank 0 reports the whole step
    weights = learners.weights()                 # the full state dict (the driver's evaluation copy)
    checkpoint = learners.finish()

With N > 1 the ranks get one placement-group bundle each (`learner.cpus_per_learner`,
`learner.gpus_per_learner`, placed by `learner.placement`), rank 0's node picks the rendezvous
address and a free port, and the ranks form one torch.distributed group (gloo on CPU, NCCL on
GPU) and one DeepSpeed engine.

Failure: one actor is restarted by Ray after a crash and resumes from its checkpoint. A process
group cannot be re-formed rank by rank, so when any rank of a group dies (or a collective fails
because one did) the whole group is killed and started again in the same bundles, with a fresh
rendezvous: every rank resumes from the last checkpoint, rank 0's stream consumer gets back
the entries it had read and not acknowledged, and the lost steps are re-trained on the same
data. `step` answers None for the call that saw the failure (the driver simply calls again);
other calls are repeated on the new group.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import ray
from ray.exceptions import RayActorError, RayTaskError

from configs.schema import Config
from learner.actor import LearnerActor, LearnerSpec, rendezvous_address

log = logging.getLogger(__name__)


class _GroupFailed(Exception):
    """A rank died; the group has been restarted from its last checkpoint."""


@dataclass
class LearnerGroup:
    actors: list
    spec: LearnerSpec | None = None
    name: str = ""
    placement: object | None = None
    restarts: int = 0
    """How many times the whole group was restarted after a rank died."""

    @classmethod
    def start(cls, cfg: Config, spec: LearnerSpec) -> LearnerGroup:
        lc, name = cfg.learner, cfg.run.name
        spec = replace(spec, cpus=lc.threads or max(1, int(lc.cpus_per_learner)))  # its torch threads
        if lc.num_learners == 1:
            # `max_task_retries=-1`: a call running when the actor died runs again on the restarted one.
            return cls([LearnerActor.options(name=f"{name}:learner", max_restarts=-1, max_task_retries=-1,
                                             num_cpus=lc.cpus_per_learner, num_gpus=lc.gpus_per_learner)
                        .remote(spec)])
        from ray.util.placement_group import placement_group

        bundle = {"CPU": lc.cpus_per_learner, **({"GPU": lc.gpus_per_learner} if lc.gpus_per_learner else {})}
        group = placement_group([bundle] * lc.num_learners, strategy=lc.placement, name=f"{name}:learners")
        ray.get(group.ready())
        handle = cls([], spec, name, group)
        handle.actors = handle._spawn()
        return handle

    def _spawn(self) -> list:
        """The ranks, one per bundle, around a fresh rendezvous on rank 0's node."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        lc, size = self.spec.learner, self.spec.learner.num_learners

        def on(rank: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank)

        master = ray.get(rendezvous_address.options(scheduling_strategy=on(0)).remote())
        return [LearnerActor.options(name=f"{self.name}:learner-{rank}", scheduling_strategy=on(rank),
                                     num_cpus=lc.cpus_per_learner, num_gpus=lc.gpus_per_learner)
                .remote(replace(self.spec, rank=rank, world_size=size, master=master))
                for rank in range(size)]

    def restart(self) -> None:
        """Kill every rank and start the group again from its last checkpoint."""
        self.restarts += 1
        log.warning("a learner rank died: restarting the group of %d from its last checkpoint (restart %d)",
                    len(self.actors), self.restarts)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        for actor in self.actors:  # the names and bundles are free once every rank is dead
            _wait_dead(actor)
        self.actors = self._spawn()

    def _on_all(self, method: str, **kwargs) -> list:
        """`method` on every rank; a rank that dies (or a collective that fails with it) restarts the
        group and raises `_GroupFailed`. A failure with every rank alive is a bug: it is raised."""
        refs = [getattr(a, method).remote(**kwargs) for a in self.actors]
        if len(refs) == 1:  # one actor: Ray restarts it and retries the call itself
            return ray.get(refs)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except RayActorError:
                self.restart()
                raise _GroupFailed from None
            except RayTaskError:
                if not self._a_rank_died(pending):
                    raise
                self.restart()
                raise _GroupFailed from None
        return ray.get(refs)

    def _a_rank_died(self, pending: list, wait_s: float = 60.0) -> bool:
        """Whether a rank is dead, telling a broken group (a survivor's collective failed when its
        peer died) from a bug: the dead rank's own call fails within `wait_s`."""
        deadline = time.monotonic() + wait_s
        while pending and time.monotonic() < deadline:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            for ref in done:
                try:
                    ray.get(ref)
                except RayActorError:
                    return True
                except RayTaskError:
                    pass
        return any(not _alive(a) for a in self.actors)

    def _retrying(self, method: str, **kwargs) -> list:
        while True:
            try:
                return self._on_all(method, **kwargs)
            except _GroupFailed:
                continue

    def version(self) -> int:
        versions = self._retrying("version")
        if len(set(versions)) != 1:
            raise RuntimeError(f"learner ranks disagree on the policy version: {versions}")
        return versions[0]

    def step(self, timeout_s: float, progress: float | None = None):
        """Every rank steps together; rank 0's `StepReport` (or None: not enough groups yet, or
        the group was just restarted). `progress`: RL's way to its end, 0..1 (the lr decay)."""
        try:
            return self._on_all("step", timeout_s=timeout_s, progress=progress)[0]
        except _GroupFailed:
            return None

    def weights(self, averaged: bool = False) -> dict:
        """The whole model's weights from rank 0 (collective under ZeRO-3: every rank takes part);
        `averaged`: the weight average of `learner.ema_decay`."""
        return self._retrying("weights", averaged=averaged)[0]

    def finish(self) -> str:
        """The final checkpoint (collective: every rank writes its shard)."""
        return self._retrying("finish")[0]

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        if self.placement is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement)


def _alive(actor, timeout_s: float = 5.0) -> bool:
    try:
        ray.get(actor.pid.remote(), timeout=timeout_s)
        return True
    except RayActorError:
        return False
    except ray.exceptions.GetTimeoutError:  # busy (in a call), so alive
        return True


def _wait_dead(actor, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(actor, timeout_s=1.0):
        time.sleep(0.2)
