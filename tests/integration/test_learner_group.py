"""`estuary train` with two learner ranks: a Ray placement group, one gloo group, one ZeRO-3 engine."""

from __future__ import annotations

from configs import load_config
from estuary.train import train


def test_two_learner_ranks_train_a_short_run_to_completion(tmp_path):
    cfg = load_config("tiny_cpu", [
        f"run.output_dir={tmp_path}", "run.name=group", "run.max_steps=3", "eval.instances=1", "eval.every_steps=0",
        "eval.budgets=[]", "model.mtp_steps=0", "model.mtp_loss_coef=0", "sft.steps=0",
        "learner.num_learners=2", "learner.zero_stage=3", "learner.groups_per_step=2", "learner.checkpoint_every=2",
        "rollout.max_concurrent_episodes=16", "rollout.group_size=4", "services.ray.num_cpus=3"])
    result = train(cfg)
    assert result.steps == 3
    assert result.checkpoint.endswith("step-000003")
    assert sorted(result.trained_groups) == [1, 2, 3]
    ids = [g for groups in result.trained_groups.values() for g in groups]
    assert len(ids) == len(set(ids)) == 6  # groups_per_step is the total over both ranks
    shards = list((tmp_path / "group/checkpoints/step-000003/trainer").rglob("*zero_pp_rank_1*"))
    assert shards, "rank 1 wrote its ZeRO-3 shard of the final checkpoint"
