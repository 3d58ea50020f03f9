"""Thinking budgets per group: drawn once per prompt, stated in the prompt, enforced on every sample."""

from __future__ import annotations

import copy
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from configs.schema import BudgetConfig, EnvironmentConfig, RolloutConfig
from environments import env_factory
from models.policy import init_policy
from rollout.episodes import Prompt, run_groups
from rollout.torch_engine import TorchEngine
from rollout.types import SamplingParams
from rollout.worker import RolloutWorker
from streams.trajectory import FORCED, POLICY, PROMPT

MATH = EnvironmentConfig(id="estuary/math", kwargs={"difficulty": 0})


@pytest.fixture(scope="module")
def policy():
    return init_policy("tiny-hybrid-moe", seed=0)


def _thinking_tokenizer(tokenizer):
    """The tokenizer with a template that opens `<think>` for the assistant (as reasoning models' do)."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = tok.chat_template.replace("<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n")
    return tok


def _groups(policy, budgets, group_size=4, tokenizer=None, max_new_tokens=24):
    engine = TorchEngine(policy, max_batch=16, max_len=256, seed=0)
    make = env_factory(MATH)
    prompts = [Prompt("math", MATH.id, make, seed=3, thinking_budget=b) for b in budgets]
    with ThreadPoolExecutor(2) as pool:
        return run_groups(engine, tokenizer or policy.tokenizer, prompts, group_size,
                          SamplingParams(max_new_tokens=max_new_tokens, grace_tokens=2), pool, 256)


def _prompt_text(tokenizer, trajectory) -> str:
    return tokenizer.decode(trajectory.token_ids[trajectory.loss_mask == PROMPT].tolist())


def test_a_groups_samples_share_one_budget_stated_in_their_prompt_tokens(policy):
    [five, nine, none] = _groups(policy, [5, 9, None])
    for group, budget in ((five, 5), (nine, 9)):
        assert group.metadata["thinking_budget"] == budget
        prompts = {_prompt_text(policy.tokenizer, s) for s in group.samples}
        assert len(prompts) == 1 and f"Thinking budget: {budget} tokens." in prompts.pop()
    assert "Thinking budget" not in _prompt_text(policy.tokenizer, none.samples[0])


def test_the_forced_close_comes_at_the_groups_budget(policy):
    tok = _thinking_tokenizer(policy.tokenizer)
    close = tok.convert_tokens_to_ids("</think>")
    [group] = _groups(policy, [5], group_size=6, tokenizer=tok)
    for s in group.samples:
        forced = np.flatnonzero(s.loss_mask == FORCED)
        assert len(forced) == 1 and s.token_ids[forced[0]] == close  # a random policy never closes itself
        thought = int(((s.loss_mask == POLICY) & (np.arange(len(s.token_ids)) < forced[0])).sum())
        assert 5 <= thought <= 5 + 2  # at the budget, plus at most the grace to reach a newline
    assert all(5 <= used <= 5 + 2 for used in group.metadata["thinking_tokens"])


def test_budgets_are_drawn_per_group_seeded_and_differ_between_groups(policy):
    cfg = RolloutConfig(group_size=4, max_concurrent_episodes=64, budget=BudgetConfig(min_tokens=4, max_tokens=64))
    envs = {"math": EnvironmentConfig(id=MATH.id, kwargs=MATH.kwargs, concurrency=64)}

    def budgets(seed):
        worker = RolloutWorker(cfg, envs, None, policy.tokenizer, None, seed=seed)
        drawn = [p.thinking_budget for _ in range(5) for p in worker.prompts()]
        worker.close()
        return drawn

    drawn = budgets(0)
    assert len(drawn) == 5 * 16 and all(4 <= b <= 64 for b in drawn)
    assert len(Counter(drawn)) > 10  # groups get different budgets
    assert drawn == budgets(0) and drawn != budgets(1)


def test_a_budget_in_the_shared_params_is_refused(policy):
    with pytest.raises(ValueError, match="Prompt.thinking_budget"), ThreadPoolExecutor(1) as pool:
        run_groups(None, policy.tokenizer, [], 2, SamplingParams(thinking_budget=8), pool, 256)
