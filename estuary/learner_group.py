"""The driver's handle on the learners: one actor, or N ranks in a Ray placement group.

    learners = LearnerGroup.start(cfg, spec)     # N = learner.num_learners
    version = learners.version()                 # every rank agrees, or it is an error
    report = learners.step(timeout_s=5)          # every rank steps; rank 0 reports the whole step
    checkpoint = learners.finish()

With N > 1 the ranks get one placement-group bundle each (`learner.cpus_per_learner`,
`learner.gpus_per_learner`; packed onto as few nodes as fit), rank 0's node picks the
rendezvous address and a free port, and the ranks form one torch.distributed group (gloo on
CPU, NCCL on GPU) and one DeepSpeed engine. One actor is restarted by Ray after a crash and
resumes from its checkpoint; a group is not restarted rank by rank (a process group cannot be
re-formed that way), so with N > 1 a dead rank ends the run with an error for now.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import ray

from configs.schema import Config
from learner.actor import LearnerActor, LearnerSpec, rendezvous_address


@dataclass
class LearnerGroup:
    actors: list
    placement: object | None = None

    @classmethod
    def start(cls, cfg: Config, spec: LearnerSpec) -> LearnerGroup:
        lc, name = cfg.learner, cfg.run.name
        spec = replace(spec, cpus=max(1, int(lc.cpus_per_learner)))
        options = dict(num_cpus=lc.cpus_per_learner, num_gpus=lc.gpus_per_learner)
        if lc.num_learners == 1:
            # `max_task_retries=-1`: a call running when the actor died runs again on the restarted one.
            return cls([LearnerActor.options(name=f"{name}:learner", max_restarts=-1, max_task_retries=-1,
                                             **options).remote(spec)])
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": lc.cpus_per_learner, **({"GPU": lc.gpus_per_learner} if lc.gpus_per_learner else {})}
        group = placement_group([bundle] * lc.num_learners, strategy="PACK", name=f"{name}:learners")
        ray.get(group.ready())

        def on(rank: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)

        master = ray.get(rendezvous_address.options(scheduling_strategy=on(0)).remote())
        actors = [LearnerActor.options(name=f"{name}:learner-{rank}", scheduling_strategy=on(rank), **options)
                  .remote(replace(spec, rank=rank, world_size=lc.num_learners, master=master))
                  for rank in range(lc.num_learners)]
        return cls(actors, group)

    def version(self) -> int:
        versions = ray.get([a.version.remote() for a in self.actors])
        if len(set(versions)) != 1:
            raise RuntimeError(f"learner ranks disagree on the policy version: {versions}")
        return versions[0]

    def step(self, timeout_s: float):
        """Every rank steps together; rank 0's `StepReport` (or None: not enough groups yet)."""
        return ray.get([a.step.remote(timeout_s=timeout_s) for a in self.actors])[0]

    def finish(self) -> str:
        """The final checkpoint (collective: every rank writes its shard)."""
        return ray.get([a.finish.remote() for a in self.actors])[0]

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        if self.placement is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement)
