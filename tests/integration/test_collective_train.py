"""`estuary train` with `weights_sync.transport=collective`: learner rank 0 broadcasts every version
to both engines (gloo), which swap it in between decode steps; the engines hold what was published,
and an engine killed with `kill -9` comes back (Ray) and rejoins the group."""

from __future__ import annotations

import os
import signal
import time

import pytest

from configs import load_config
from estuary.train import train
from models.policy import load_policy


def served(run: str, workers: int, at_least: int, timeout_s: float = 30.0) -> list[dict]:
    """Each engine's `RolloutActor.served()`, once it has received version `at_least` (the broadcast
    is complete when `publish` returns; unpacking it on the engine takes a moment more)."""
    import ray

    actors = [ray.get_actor(f"{run}:rollout-{i}", namespace="estuary") for i in range(workers)]
    deadline = time.monotonic() + timeout_s
    while True:
        states = ray.get([a.served.remote() for a in actors])
        if all(s["received"] >= at_least for s in states) or time.monotonic() > deadline:
            return states
        time.sleep(0.1)


# slow: the default suite drives the collective transport through estuary train in
# test_two_node_cluster.py, and an engine's rejoin after kill -9 in
# tests/unit/weights_sync/test_collective_membership.py (2.5 minutes saved in CI).
@pytest.mark.slow
def test_collective_transport_runs_estuary_train_and_a_restarted_engine_rejoins(tmp_path):
    cfg = load_config("tiny_cpu", [
        f"run.output_dir={tmp_path}", "run.name=coll", "run.max_steps=4", "eval.instances=1", "eval.every_steps=2",
        "eval.budgets=[]", "model.mtp_steps=0", "model.mtp_loss_coef=0", "sft.steps=0", "learner.groups_per_step=2",
        "learner.checkpoint_every=2", "rollout.num_workers=2", "rollout.max_concurrent_episodes=16",
        "rollout.group_size=4", "services.ray.num_cpus=3", "weights_sync.transport=collective"])
    probes: dict[int, list[dict]] = {}

    def probe(version, _services):
        if version not in probes:  # (a restarted learner would report a step again)
            probes[version] = served("coll", 2, at_least=version)
        if version == 1:  # Ray restarts it: a new process that must rejoin the broadcast group
            import ray

            os.kill(ray.get(ray.get_actor("coll:rollout-0", namespace="estuary").pid.remote()), signal.SIGKILL)

    result = train(cfg, on_step=probe)
    assert result.steps == 4 and sorted(result.trained_groups) == [1, 2, 3, 4]
    assert [s["received"] for s in probes[1]] == [1, 1]
    for version in (2, 3, 4):  # every published version reached the engine that kept running
        assert probes[version][1]["received"] == version, probes
    # the restarted engine rejoined: the group was re-formed around it at a publication after its
    # start (its constructor ran during the probe of step 2), and it received every version since
    assert [probes[v][0]["received"] for v in (3, 4)] == [3, 4], probes
    assert [probes[v][1]["version"] for v in (1, 2, 3, 4)] == sorted(probes[v][1]["version"] for v in (1, 2, 3, 4))
    assert probes[4][1]["version"] >= 1, probes  # the engines served trained weights
    final = load_policy(result.checkpoint).model.state_dict()
    expected = sum(float(t.double().sum()) for t in final.values() if t.is_floating_point())
    for state in probes[4]:  # what the engines hold is the final checkpoint's weights
        assert state["weights_sum"] == pytest.approx(expected, rel=1e-9)
