"""Held-out evaluation on a tiny real policy: n samples per instance in one batched generate per
environment and budget, exact correctness for the pass rates, errors across instances."""

from __future__ import annotations

import random

import pytest

import environments
from configs.schema import EnvironmentConfig, EvalConfig, RolloutConfig, SamplingConfig
from environments.base import Task, TextEnv, TurnResult
from estuary.evaluate import evaluate
from estuary.run_log import eval_summary
from models.policy import init_policy
from rollout.torch_engine import TorchEngine


class Graded(TextEnv):
    """Scores every answer with a fixed correctness: 1.0 (right) or 0.5 (partial credit, not a pass)."""

    credit = 1.0

    def generate(self, rng: random.Random) -> Task:
        return Task(prompt=f"Say {rng.randrange(100)}.", answer="")

    def from_row(self, row):
        raise TypeError("generated tasks only")

    def score_turn(self, action: str) -> TurnResult:
        return TurnResult(done=True, correct=self.credit, verdict="graded")

    def reference_turn(self) -> str:
        return "ok"


class HalfCredit(Graded):
    credit = 0.5


environments.register("test/right", Graded)
environments.register("test/half-credit", HalfCredit)


def test_eval_reports_errors_and_pass_at_k_from_one_batched_generate_per_environment(monkeypatch):
    calls = []
    real = TorchEngine.generate

    def spy(self, requests):
        calls.append([(r.params.n, r.params.thinking_budget) for r in requests])
        return real(self, requests)

    monkeypatch.setattr(TorchEngine, "generate", spy)
    policy = init_policy("tiny-hybrid-moe", seed=0)
    envs = {"right": EnvironmentConfig(id="test/right"), "half": EnvironmentConfig(id="test/half-credit")}
    rollout = RolloutConfig(max_concurrent_episodes=4, max_len=128, sampling=SamplingConfig(max_new_tokens=4))
    cfg = EvalConfig(instances=3, samples_per_instance=2, pass_k=2, budgets=[3])
    results = evaluate(policy, envs, cfg, rollout, seed=0)

    assert set(results) == {"right", "right:budget3", "half", "half:budget3"}
    # one generate per environment and budget: every instance, its n samples from one prefill
    assert calls == [[(2, None)] * 3, [(2, 3)] * 3] * 2
    right, half = results["right"], results["half:budget3"]
    assert right["instances"] == 3 and right["samples"] == 6 and right["failed"] == 0
    assert (right["reward"], right["reward_se"], right["pass_at_1"], right["pass_at_2"]) == (1.0, 0.0, 1.0, 1.0)
    assert half["reward"] == pytest.approx(0.5) and half["pass_at_1"] == 0.0 and half["pass_at_2"] == 0.0
    assert eval_summary(right) == "reward 1.00±0.00 pass@1 1.00±0.00 pass@2 1.00±0.00"


def test_eval_config_refuses_pass_k_above_the_samples_drawn():
    from configs.errors import ConfigError

    with pytest.raises(ConfigError, match="pass@k needs at least k samples"):
        EvalConfig(samples_per_instance=2, pass_k=4)
