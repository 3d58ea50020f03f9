"""`estuary train` with two learner ranks (a Ray placement group, one gloo group, one ZeRO-3 engine)
runs to its last step although a rank is killed with `kill -9`: the whole group restarts from its
last checkpoint."""

from __future__ import annotations

import os
import signal

from configs import load_config
from estuary.train import train


def test_a_rank_killed_with_kill_9_restarts_the_whole_group_from_its_checkpoint(tmp_path):
    import ray

    from learner.checkpoint import commit_records

    cfg = load_config("tiny_cpu", [
        f"run.output_dir={tmp_path}", "run.name=regroup", "run.max_steps=5", "eval.instances=1",
        "eval.every_steps=0", "eval.budgets=[]", "model.mtp_steps=0", "model.mtp_loss_coef=0", "sft.steps=0",
        "learner.num_learners=2", "learner.zero_stage=3", "learner.groups_per_step=2", "learner.checkpoint_every=2",
        "rollout.max_concurrent_episodes=16", "rollout.group_size=4", "services.ray.num_cpus=3"])
    killed: list[int] = []

    def kill_rank_1(version, _services):
        if version == 3 and not killed:  # step 3 trained, the checkpoint is at step 2
            pid = ray.get(ray.get_actor("regroup:learner-1", namespace="estuary").pid.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    result = train(cfg, on_step=kill_rank_1)
    assert killed and result.steps == 5
    assert sorted(result.trained_groups) == [1, 2, 3, 4, 5]
    ids = [g for groups in result.trained_groups.values() for g in groups]
    assert len(ids) == len(set(ids)) == 10  # groups_per_step is the total over both ranks; the re-trained
    # step 3 took the same groups: nothing twice
    committed = [g for record in commit_records(tmp_path / "regroup") for g in record["groups"]]
    assert sorted(committed) == sorted(ids)  # every trained group committed once: nothing lost
    shards = list((tmp_path / "regroup/checkpoints/step-000005/trainer").rglob("*zero_pp_rank_1*"))
    assert shards, "rank 1 wrote its ZeRO-3 shard of the final checkpoint"
