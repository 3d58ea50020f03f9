"""GRPO learns: the real rollout worker, stream, learner and weight sync raise a rewarded habit.

A test environment pays 1 when the answer contains the letter "e". A random-init policy's
answers (three random tokens) contain one about half of the time; a few GRPO steps through
the whole data path (engine log-probs -> trajectory schema -> Redis stream -> learner ->
shared-memory weight sync -> engine) must make that much more frequent. A sign error in the
advantages or the loss, log-probs misaligned with their tokens, or weights that never reach
the engine all leave the reward flat.
"""

from __future__ import annotations

import numpy as np

import environments
from configs.schema import EnvironmentConfig, LearnerConfig, RolloutConfig, SamplingConfig
from environments import Task, TextEnv, TurnResult
from learner.worker import LearnerWorker
from models.policy import init_policy
from rollout.torch_engine import TorchEngine
from rollout.worker import RolloutWorker
from streams.redis_server import EmbeddedRedis
from streams.redis_stream import TrajectoryStream
from weights_sync.local import SharedMemoryWeightSync


class LetterEnv(TextEnv):
    """Say anything; an answer with an "e" in it is rewarded."""

    description = "rewards answers that contain the letter e"

    def generate(self, rng):
        return Task(prompt=f"Say a word (try {rng.randint(0, 99)}).", answer="e")

    def from_row(self, row):
        return Task(prompt=row["prompt"], answer="e")

    def score_turn(self, action):
        ok = "e" in action
        return TurnResult(done=True, correct=float(ok), verdict="correct" if ok else "wrong")

    def reference_turn(self):
        return "the"


def test_grpo_raises_the_reward_of_a_habit_through_the_whole_data_path(tmp_path):
    environments.register("test/letter-e", entry_point=LetterEnv, package="tests")
    rollout = RolloutConfig(group_size=8, max_concurrent_episodes=64, max_len=128,
                            sampling=SamplingConfig(max_new_tokens=3))
    envs = {"letter": EnvironmentConfig(id="test/letter-e", concurrency=64, timeout_s=10)}
    learner_cfg = LearnerConfig(backend="torch", lr=5e-3, groups_per_step=4, micro_batch_tokens=4096,
                                checkpoint_every=0, max_staleness=1)
    publisher, reader = SharedMemoryWeightSync(tmp_path / "weights"), SharedMemoryWeightSync(tmp_path / "weights")
    with EmbeddedRedis() as server:
        learner = LearnerWorker(learner_cfg, init_policy("tiny-hybrid-moe", seed=0),
                                TrajectoryStream(server.url, consumer="learner"), tmp_path / "run", sync=publisher)
        engine = TorchEngine(init_policy("tiny-hybrid-moe", seed=0), max_batch=64, max_len=128)
        worker = RolloutWorker(rollout, envs, engine, engine.tokenizer,
                               TrajectoryStream(server.url, consumer="rollout"), reader, seed=0)
        rewards = []
        for _ in range(16):  # generate, then train (no step once nearly every group is all 1s)
            groups = worker.round()
            rewards.append(np.mean([s.reward for g in groups for s in g.samples]))
            learner.step(timeout_s=2)
        worker.close()
    reader.close()
    publisher.close()  # unlinks the shared-memory ring
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert engine.version >= 5  # the engine generated with the learner's newer weights
    assert last > first + 0.25, rewards
