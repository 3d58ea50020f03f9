"""The rollout worker with a real tiny engine, real environments and a real Redis stream."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

import environments
from configs.schema import EnvironmentConfig, RolloutConfig, SamplingConfig
from environments.base import Task, TextEnv, TurnResult
from models.policy import init_policy
from rollout.torch_engine import TorchEngine
from rollout.worker import RolloutWorker
from streams.redis_server import EmbeddedRedis
from streams.redis_stream import TrajectoryStream
from streams.trajectory import FORCED, POLICY, PROMPT


class TwoTurns(TextEnv):
    """Asks for a second turn after the first, then scores the parity of the answer's length (mixed rewards)."""

    def generate(self, rng: random.Random) -> Task:
        return Task(prompt=f"Say something about {rng.randrange(100)}.", answer="")

    def from_row(self, row):  # generated tasks only: this test environment has no data set
        raise TypeError("TwoTurns takes no dataset rows")

    def score_turn(self, action: str) -> TurnResult:
        if self.turn == 1:
            return TurnResult(done=False, reply=[{"role": "user", "content": "And once more?"}])
        return TurnResult(done=True, correct=float(len(action) % 2), verdict="ok")

    def reference_turn(self) -> str:
        return "ok"


class Broken(TwoTurns):
    def score_turn(self, action: str) -> TurnResult:
        raise RuntimeError("scoring service down")


class Hangs(TwoTurns):
    def score_turn(self, action: str) -> TurnResult:
        time.sleep(3)
        return TurnResult(done=True)


HOLD = threading.Event()


class Held(TwoTurns):
    """A step that hangs until the test lets it go."""

    def score_turn(self, action: str) -> TurnResult:
        HOLD.wait(120)
        return TurnResult(done=True, correct=1.0)


class Slow(TwoTurns):
    def score_turn(self, action: str) -> TurnResult:
        time.sleep(0.3)
        return TurnResult(done=True, correct=1.0)


environments.register("test/two-turns", TwoTurns, max_turns=2)
environments.register("test/slow", Slow)
environments.register("test/broken", Broken)
environments.register("test/hangs", Hangs)
environments.register("test/held", Held)


def _worker(server, envs, group_size=4, episodes=8, max_new_tokens=12):
    policy = init_policy("tiny-hybrid-moe", seed=0)
    cfg = RolloutConfig(group_size=group_size, max_concurrent_episodes=episodes, max_len=256,
                        sampling=SamplingConfig(max_new_tokens=max_new_tokens))
    engine = TorchEngine(policy, max_batch=episodes, max_len=256, seed=0)
    stream = TrajectoryStream(server.url, consumer="rollout-0")
    return RolloutWorker(cfg, envs, engine, policy.tokenizer, stream, seed=0), policy


def test_groups_carry_multi_turn_tokens_masks_and_behaviour_log_probs():
    with EmbeddedRedis() as server:
        worker, policy = _worker(server, {"two": EnvironmentConfig(id="test/two-turns"),
                                          "math": EnvironmentConfig(id="estuary/math", kwargs={"difficulty": 0})})
        groups = worker.round()
        assert groups and all(len(g.samples) == 4 for g in groups)
        assert {g.metadata["env"] for g in groups} <= {"two", "math"}
        learner = TrajectoryStream(server.url, consumer="learner")
        got = learner.read(count=10, block_ms=500)
        assert [e.group.group_id for e in got] == [g.group_id for g in groups]  # all published, in order
        for name in {g.metadata["env"] for g in groups}:  # what every generated sample scored, per env
            mine = [s.reward for g in groups if g.metadata["env"] == name for s in g.samples]
            assert worker.counters[f"{name}/samples"] == len(mine)
            assert worker.counters[f"{name}/reward_sum"] == pytest.approx(sum(mine))
            verdicts = {k: v for k, v in worker.counters.items() if k.startswith(f"{name}/verdict/")}
            assert sum(verdicts.values()) == len(mine), verdicts  # every sample's verdict, counted
            assert worker.counters[f"{name}/verdict_hack_like"] == 0
        for group in groups:
            for s in group.samples:
                policy_tokens = np.isin(s.loss_mask, (POLICY, FORCED))
                assert (s.logprobs[s.loss_mask == POLICY] < 0).all() and (s.logprobs[~policy_tokens] == 0).all()
                assert set(s.versions[policy_tokens]) == {0} and set(s.versions[~policy_tokens]) == {-1}
                assert s.loss_mask[0] == PROMPT
            if group.metadata["env"] == "two":
                s = group.samples[0]
                spans = np.flatnonzero(np.diff((s.loss_mask == PROMPT).astype(int)) != 0)
                assert len(spans) >= 3  # prompt, turn 1, the environment's reply, turn 2
                assert "And once more?" in policy.tokenizer.decode(s.token_ids)
                assert group.metadata["turns"] == [2] * 4


def test_an_environment_that_raises_or_hangs_fails_its_episodes_and_the_worker_goes_on():
    with EmbeddedRedis() as server:
        envs = {"broken": EnvironmentConfig(id="test/broken"),
                "hangs": EnvironmentConfig(id="test/hangs", timeout_s=0.5),
                "two": EnvironmentConfig(id="test/two-turns")}
        worker, _ = _worker(server, envs, group_size=2, episodes=6)
        start = time.monotonic()
        for _ in range(2):
            worker.round()
        assert time.monotonic() - start < 30
        assert worker.counters["episodes_failed"] > 0 and worker.counters["groups"] > 0
        failures = []
        worker.stream = TrajectoryStream(server.url, consumer="rollout-0")
        from rollout.episodes import Prompt, run_groups

        for name in ("broken", "hangs"):
            [group] = run_groups(worker.engine, worker.tokenizer, [Prompt(name, envs[name].id, worker.factories[name],
                                 seed=1, timeout_s=0.5)], 2, worker.params, worker.pool, 256)
            failures += group.metadata["failed"]
        assert any("scoring service down" in f for f in failures)
        assert any("timed out" in f for f in failures)


def test_a_hung_environment_step_does_not_delay_the_other_groups_publication():
    """The other groups reach the stream while one group's environment step still hangs."""
    with EmbeddedRedis() as server:
        envs = {"held": EnvironmentConfig(id="test/held", weight=100.0, concurrency=2, timeout_s=120),
                "two": EnvironmentConfig(id="test/two-turns")}
        worker, _ = _worker(server, envs, group_size=2, episodes=6)
        HOLD.clear()
        rounds: list = []
        thread = threading.Thread(target=lambda: rounds.append(worker.round()))
        thread.start()
        learner = TrajectoryStream(server.url, consumer="learner")
        seen: list[str] = []
        deadline = time.monotonic() + 120
        while len(seen) < 2 and time.monotonic() < deadline:
            seen += [entry.group.metadata["env"] for entry in learner.read(count=10, block_ms=500)]
        still_hung = thread.is_alive()
        HOLD.set()
        thread.join(120)
        assert seen == ["two", "two"] and still_hung
        assert [g.metadata["env"] for g in rounds[0]] == ["two", "two", "held"]


def test_environments_share_the_groups_with_differing_rewards_by_weight():
    """`rollout.mix=informative`: the environment with the fewest mixed-reward groups per unit of
    weight goes next, whichever finishes its episodes sooner; `weight` draws at random by weight."""
    from collections import Counter

    with EmbeddedRedis() as server:
        envs = {"fast": EnvironmentConfig(id="test/two-turns", weight=2.0),
                "slow": EnvironmentConfig(id="test/two-turns", weight=1.0)}
        worker, _ = _worker(server, envs, group_size=2)
        worker.counters.update({"fast/informative_groups": 3, "slow/informative_groups": 2})
        assert {worker._draw(Counter()).name for _ in range(20)} == {"fast"}  # 3/2 per weight < 2/1
        worker.counters["fast/informative_groups"] = 5
        assert {worker._draw(Counter()).name for _ in range(20)} == {"slow"}
        assert worker._draw(Counter(slow=4)).name == "fast"  # the least served is full: the next goes
        worker.counters["slow/groups_done"] = 40  # 40 groups, none with differing rewards: served as 10
        assert {worker._draw(Counter()).name for _ in range(20)} == {"fast"}  # never starves the other
        worker.cfg.mix = "weight"
        assert {worker._draw(Counter()).name for _ in range(40)} == {"fast", "slow"}
        groups = worker.round()  # a published group counts when its rewards differ
        mixed = sum(len({s.reward for s in g.samples}) > 1 for g in groups)
        assert groups and sum(worker.counters[f"{n}/informative_groups"] for n in envs) == 5 + 2 + mixed
        assert sum(worker.counters[f"{n}/groups_done"] for n in envs) == 40 + len(groups)


def test_unknown_environment_fails_at_start_up():
    with EmbeddedRedis() as server, pytest.raises(Exception, match="estuary/mathh"):
        _worker(server, {"m": EnvironmentConfig(id="estuary/mathh")})


def test_a_stopped_worker_does_not_wait_forever_on_a_full_stream():
    with EmbeddedRedis() as server:
        worker, _ = _worker(server, {"two": EnvironmentConfig(id="test/two-turns")}, group_size=2, episodes=4)
        worker.stream = TrajectoryStream(server.url, consumer="rollout-0", max_len=1)  # nobody consumes
        worker.stop()
        start = time.monotonic()
        published = worker.round()  # two groups: the first fills the stream, the second gives up
        assert len(published) == 1 and time.monotonic() - start < 30


def test_a_time_out_counts_from_when_the_step_starts_not_while_it_waits_for_a_thread():
    """Six 0.3 s steps on one thread take 1.8 s: none is past its own 1 s time-out (an eval's batch)."""
    from concurrent.futures import ThreadPoolExecutor

    from environments import env_factory
    from rollout.episodes import Prompt, run_groups
    from rollout.types import SamplingParams

    policy = init_policy("tiny-hybrid-moe", seed=0)
    engine = TorchEngine(policy, max_batch=8, max_len=256, seed=0)
    make = env_factory(EnvironmentConfig(id="test/slow"))
    with ThreadPoolExecutor(max_workers=1) as pool:
        [group] = run_groups(engine, policy.tokenizer, [Prompt("slow", "test/slow", make, seed=1, timeout_s=1.0)],
                             6, SamplingParams(max_new_tokens=4), pool, 256)
    assert group.metadata["failed"] == [] and len(group.samples) == 6
