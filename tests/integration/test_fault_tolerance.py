"""kill -9 a rollout worker, the Redis server (its supervisor restarts it) and the learner: the run
finishes and loses nothing."""

from __future__ import annotations

import os
import signal
import time

import redis

from configs import load_config
from estuary.train import train


def _pid(actor_name: str) -> int:
    import ray

    return ray.get(ray.get_actor(actor_name, namespace="estuary").pid.remote())


def test_killed_processes_and_a_redis_restart_lose_nothing(tmp_path):
    cfg = load_config("tiny_cpu", [
        f"run.output_dir={tmp_path}", "run.name=chaos", "run.max_steps=5", "eval.instances=1", "eval.every_steps=0",
        "eval.budgets=[]", "model.mtp_steps=0", "sft.steps=0", "learner.groups_per_step=2", "learner.checkpoint_every=2",
        "rollout.max_concurrent_episodes=16", "rollout.group_size=4", "services.redis.durable=true",
        "stream.claim_idle_ms=5000"])
    events = []

    def chaos(version, svc):
        if version == 1 and not events:
            os.kill(_pid("chaos:rollout-0"), signal.SIGKILL)
            events.append("rollout killed")
        elif version == 2 and len(events) == 1:
            os.kill(svc.redis.pid, signal.SIGKILL)  # the server dies under live producers and the learner
            deadline = time.monotonic() + 30
            while svc.redis.restarts < 1:  # its supervisor starts it again: same port, the AOF replayed
                assert time.monotonic() < deadline, "the supervised Redis did not come back"
                time.sleep(0.1)
            events.append("redis restarted")
        elif version == 3 and len(events) == 2:  # once: the resumed learner reports step 3 again
            os.kill(_pid("chaos:learner"), signal.SIGKILL)  # step 3 trained, checkpoint is at step 2
            events.append("learner killed")

    result = train(cfg, on_step=chaos)
    assert events == ["rollout killed", "redis restarted", "learner killed"]
    assert result.steps == 5
    assert sorted(result.trained_groups) == [1, 2, 3, 4, 5]
    ids = [g for groups in result.trained_groups.values() for g in groups]
    assert len(ids) == len(set(ids)) == 10  # every step trained on its own groups: nothing twice
    # the final checkpoint committed everything the learner consumed (the server is gone with the
    # run, but its append-only file holds the stream as the run left it)
    from streams.redis_server import EmbeddedRedis

    with EmbeddedRedis(data_dir=tmp_path / "chaos/redis", durable=True) as server:
        client = redis.Redis.from_url(server.url)
        published = client.scard(f"{cfg.stream.key}:published")
        left = client.xlen(cfg.stream.key)
        info = client.xpending(cfg.stream.key, "learners")
        assert published >= 10 and left + 10 <= published  # trained groups were acknowledged and removed
        assert info["pending"] <= cfg.learner.groups_per_step  # at most read-but-untrained groups remain
