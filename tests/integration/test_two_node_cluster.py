"""A two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`): two ZeRO-3 learner ranks
(gloo) and two rollout workers, one of each per node, weights back by collective broadcast.

The run is asynchronous, so which groups it trains on is not known in advance. What is compared:
the groups each step trained on are read from the Redis stream before they are acknowledged
(`checkpoint_every` past the run: nothing is acknowledged before the final checkpoint), then one
plain-torch learner trains on exactly those groups, step by step in the same order, from the
same starting policy; its weights must equal the two ranks' final checkpoint within float noise.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import ray
import redis
import torch

from configs import load_config
from estuary.train import train
from learner.worker import LearnerWorker
from models.policy import load_policy
from streams.redis_server import EmbeddedRedis
from streams.redis_stream import TrajectoryStream
from streams.trajectory import decode

STEPS = 3


@pytest.fixture
def two_nodes(monkeypatch):
    from ray._raylet import Config
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a cluster of our own, on loopback
    Config.initialize("")  # Ray caches the mode when first imported
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _nodes(run: str) -> dict[str, str]:
    names = [f"{run}:learner-0", f"{run}:learner-1", f"{run}:rollout-0", f"{run}:rollout-1"]
    return dict(zip(names, ray.get([ray.get_actor(n, namespace="estuary").node.remote() for n in names]),
                    strict=True))


def test_two_learner_ranks_on_two_nodes_train_the_weights_one_learner_trains_on_the_same_groups(
        tmp_path, two_nodes):
    cfg = load_config("tiny_cpu", [
        f"run.output_dir={tmp_path}", "run.name=nodes", f"run.max_steps={STEPS}", "eval.instances=1",
        "eval.every_steps=0", "eval.budgets=[]", "model.mtp_steps=0", "model.mtp_loss_coef=0", "sft.steps=0",
        "learner.num_learners=2", "learner.zero_stage=3", "learner.placement=STRICT_SPREAD",
        "learner.groups_per_step=2", "learner.checkpoint_every=10", "rollout.num_workers=2",
        "rollout.placement=SPREAD", "rollout.max_concurrent_episodes=16", "rollout.group_size=4",
        "weights_sync.transport=collective", f"services.ray.address={two_nodes.address}"])
    groups, nodes = {}, {}

    def record(version, services):
        if version == 1:
            nodes.update(_nodes("nodes"))
        if version == STEPS:  # every trained group is still in the stream, unacknowledged
            client = redis.Redis.from_url(services.redis_url)
            for _, fields in client.xrange(cfg.stream.key):
                group = decode(fields[b"g"])
                groups[group.group_id] = group

    result = train(cfg, on_step=record)
    assert result.steps == STEPS
    assert nodes["nodes:learner-0"] != nodes["nodes:learner-1"], nodes  # one rank per node
    assert nodes["nodes:rollout-0"] != nodes["nodes:rollout-1"], nodes  # one engine per node

    reference = _one_learner_on(result.trained_groups, groups, cfg, tmp_path)
    ours = load_policy(result.checkpoint).model.state_dict()
    initial = load_policy(tmp_path / "nodes/policy").model.state_dict()
    assert sum(not torch.equal(reference[k], initial[k]) for k in reference) > 10  # it trained
    worst = max((ours[k] - reference[k]).abs().max().item() for k in reference)
    # float noise only: Adam can turn it into a visible step on a weight with a near-zero gradient
    # (the lr is 1e-4 here), never into a different update
    print("WORST_DIFF", worst, "MOVED", sum(not torch.equal(reference[k], initial[k]) for k in reference), len(reference))
    assert worst < 5e-6, worst


def _one_learner_on(trained: dict[int, list[str]], groups: dict, cfg, tmp_path) -> dict[str, torch.Tensor]:
    """One plain-torch learner's weights after training on `trained[v]` at each step v, in order."""
    with EmbeddedRedis() as server:
        stream = TrajectoryStream(server.url, key="replay", consumer="one")
        for version in sorted(trained):
            for group_id in trained[version]:
                stream.publish(groups[group_id])
        s = cfg.rollout.sampling
        worker = LearnerWorker(replace(cfg.learner, backend="torch", num_learners=1, checkpoint_every=0),
                               load_policy(tmp_path / "nodes/policy"), stream, tmp_path / "one",
                               temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        while worker.version < STEPS:
            report = worker.step(timeout_s=30)
            assert report is not None and report.group_ids == trained[report.version]
        return {k: v.detach().clone() for k, v in worker.policy.model.state_dict().items()}
