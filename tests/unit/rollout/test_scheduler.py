"""Turn-level scheduling on a tiny real policy: exact multi-turn log-probs with the engine's state
kept across turns, groups handed over as soon as they are done, hung environments isolated."""

from __future__ import annotations

import copy
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import environments
from configs.schema import EnvironmentConfig
from environments import env_factory
from environments.base import TurnResult
from environments.tool_use import ToolUseEnv
from learner.objective import logprobs_from_logits
from models.mtp import add_mtp_heads
from models.policy import init_policy
from rollout.episodes import Prompt
from rollout.scheduler import TurnScheduler
from rollout.torch_engine import TorchEngine
from rollout.types import SamplingParams
from streams.trajectory import FORCED, POLICY, PROMPT

RELEASE = threading.Event()  # what the blocking environment waits for


class ScriptedCalls(ToolUseEnv):
    """`estuary/tool_use` where every turn but the last calls `lookup` whatever the policy wrote (a
    random policy never writes a call): real tool replies between real policy turns."""

    def score_turn(self, action: str) -> TurnResult:
        if self.turn < self.max_turns:
            title = next(iter(self.task.data["store"]))
            action = f'<tool_call>{json.dumps({"name": "lookup", "arguments": {"title": title}})}</tool_call>'
        return super().score_turn(action)


class Blocks(ScriptedCalls):
    """Its step waits until the test lets it go: a hung environment."""

    def score_turn(self, action: str) -> TurnResult:
        RELEASE.wait(60)
        return TurnResult(done=True, correct=1.0, verdict="late")


environments.register("test/scripted-tool-use", ScriptedCalls, max_turns=3, difficulty=0)
environments.register("test/blocks", Blocks, max_turns=3)


class GenerateOnly:
    """An engine with only `generate` (as vLLM here): the scheduler re-sends whole conversations."""

    def __init__(self, engine: TorchEngine) -> None:
        self.inner, self.version = engine, engine.version

    def generate(self, requests):
        return self.inner.generate(requests)

    def release(self, handle) -> None:
        self.inner.release(handle)


@pytest.fixture(scope="module")
def policy():
    return init_policy("tiny-hybrid-moe", seed=0)


def _thinking(tokenizer):
    """A template that opens `<think>` for the assistant, so budgets force tokens on every turn."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = tok.chat_template.replace("<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n")
    return tok


def _prompt(env_id: str, seed: int, timeout_s: float = 30.0, budget: int | None = None) -> Prompt:
    return Prompt(env_id.split("/")[1], env_id, env_factory(EnvironmentConfig(id=env_id)), seed, timeout_s,
                  thinking_budget=budget)


def _run(engine, tokenizer, prompts, group_size=3, max_new_tokens=10, on_group=None, pool_size=4):
    got = []

    def take(group):
        got.append((time.monotonic(), group))
        return on_group(group) if on_group else True

    with ThreadPoolExecutor(pool_size) as pool:
        scheduler = TurnScheduler(engine, tokenizer, group_size, SamplingParams(
            max_new_tokens=max_new_tokens, temperature=0.7, grace_tokens=1), pool, max_len=512)
        scheduler.run(prompts, take)
        RELEASE.set()  # let any blocked step end before the pool shuts down
    return got


@pytest.mark.parametrize("stepping,mtp", [(True, 0), (True, 2), (False, 0)],
                         ids=["kept-state", "kept-state+mtp-drafts", "generate-only"])
def test_multi_turn_tool_use_log_probs_and_masks_match_a_full_forward(policy, stepping, mtp):
    if mtp:  # speculative decoding with continuations: the kept state is rolled back and resumed
        policy = init_policy("tiny-hybrid-moe", seed=0)
        add_mtp_heads(policy.model, seed=3)
    engine = TorchEngine(policy, max_batch=8, max_len=512, seed=0, mtp_steps=mtp)
    prefilled = []
    extend = engine.decoder.extend
    engine.decoder.extend = lambda state, slot, ids, *a, **k: (prefilled.append(len(ids)),
                                                                extend(state, slot, ids, *a, **k))[1]
    tok = _thinking(policy.tokenizer)
    prompts = [_prompt("test/scripted-tool-use", seed, budget=3) for seed in (1, 2)]
    got = _run(engine if stepping else GenerateOnly(engine), tok, prompts)
    assert len(got) == 2 and len(engine.free) == 8  # every kept slot came back
    first_prompts = 0
    for _, group in got:
        assert group.metadata["failed"] == [] and group.metadata["turns"] == [3, 3, 3]
        assert group.metadata["verdicts"] and group.metadata["thinking_budget"] == 3
        first = int(np.argmax(group.samples[0].loss_mask != PROMPT))
        first_prompts += first
        for s in group.samples:
            assert (s.loss_mask == FORCED).any()  # the budget forced `</think>` on some turns
            assert "<tool_response>" in tok.decode(s.token_ids.tolist())  # the environment's replies
            with torch.no_grad():
                logits = policy.model(torch.tensor(s.token_ids[None], dtype=torch.long)).logits
            full, _ = logprobs_from_logits(logits, torch.tensor(s.token_ids[None], dtype=torch.long), 0.7)
            own = s.loss_mask == POLICY
            assert np.abs(full[0].numpy()[own] - s.logprobs[own]).max() < 1e-4
            assert (s.logprobs[~own] == 0).all() and set(s.versions[s.loss_mask == PROMPT]) == {-1}
    continuations = sum(int((s.loss_mask == PROMPT).sum()) - int(np.argmax(s.loss_mask != PROMPT))
                        for _, g in got for s in g.samples)
    if stepping:  # each prompt prefilled once for its G samples, then only the tokens after each turn
        assert sum(prefilled) == first_prompts + continuations
    else:  # whole conversations again every turn
        assert sum(prefilled) > first_prompts + continuations


def test_a_hung_environment_delays_only_its_own_group(policy):
    """Two quick groups are handed over while the third group's step still hangs; it follows once let go."""
    RELEASE.clear()
    engine = TorchEngine(policy, max_batch=8, max_len=512, seed=0)
    quick = []

    def on_group(group):
        if group.metadata["env"] == "scripted-tool-use":
            quick.append(RELEASE.is_set())
            if len(quick) == 2:
                RELEASE.set()
        return True

    prompts = [_prompt("test/blocks", 1), _prompt("test/scripted-tool-use", 2), _prompt("test/scripted-tool-use", 3)]
    got = _run(engine, policy.tokenizer, prompts, group_size=2, on_group=on_group)
    assert [g.metadata["env"] for _, g in got] == ["scripted-tool-use", "scripted-tool-use", "blocks"]
    assert quick == [False, False]  # both published while the hung step was still waiting
    assert got[-1][1].metadata["failed"] == [] and got[-1][1].metadata["verdicts"] == ["late", "late"]


def test_a_step_past_its_time_out_fails_only_its_episodes(policy):
    RELEASE.clear()
    engine = TorchEngine(policy, max_batch=8, max_len=512, seed=0)
    prompts = [_prompt("test/blocks", 1, timeout_s=0.5), _prompt("test/scripted-tool-use", 2)]
    start = time.monotonic()
    got = _run(engine, policy.tokenizer, prompts, group_size=2)
    assert time.monotonic() - start < 30  # not the blocked step's 60 s
    groups = {g.metadata["env"]: g for _, g in got}
    assert groups["blocks"].metadata["failed"] == ["environment step timed out"] * 2
    assert not groups["blocks"].samples and len(groups["scripted-tool-use"].samples) == 2
    assert len(engine.free) == 8 and not engine.has_work()


def test_stopping_early_leaves_the_engine_clean(policy):
    engine = TorchEngine(policy, max_batch=8, max_len=512, seed=0)
    prompts = [_prompt("test/scripted-tool-use", s) for s in (1, 2, 3, 4)]
    got = _run(engine, policy.tokenizer, prompts, group_size=2, on_group=lambda group: False)
    assert len(got) == 1  # the first finished group said stop: the others are dropped
    assert len(engine.free) == 8 and not engine.has_work()


def test_only_turns_that_can_go_on_keep_engine_state(policy):
    """A last turn (every turn of a single-turn environment) frees its slot when it ends instead of
    holding it until judged; the turns before it keep their state for the next turn's tokens only."""
    engine = TorchEngine(policy, max_batch=8, max_len=512, seed=0)
    submitted, held = [], []
    submit, step = engine.submit, engine.step

    def record(request):
        submitted.append((request.params.keep_state, request.parent is not None))
        submit(request)

    def step_and_count():
        out = step()
        # slots held by finished samples while their turn is judged
        held.append(engine.max_batch - len(engine.free) - len(engine._active))
        return out

    engine.submit, engine.step = record, step_and_count
    got = _run(engine, policy.tokenizer, [_prompt("estuary/math", 1), _prompt("estuary/math", 2)], group_size=2)
    assert len(got) == 2 and submitted == [(False, False)] * 2 and max(held) == 0
    submitted.clear()
    got = _run(engine, policy.tokenizer, [_prompt("test/scripted-tool-use", 1)], group_size=2)
    assert got[0][1].metadata["turns"] == [3, 3]
    # the first turn for the group, then per episode a kept continuation and a last turn that is not kept
    assert sorted(submitted) == [(False, True)] * 2 + [(True, False)] + [(True, True)] * 2
    assert len(engine.free) == 8 and not engine.has_work()


def test_a_turn_without_kept_state_resends_the_whole_conversation(policy, monkeypatch):
    """An environment that goes on past what its `max_turns` said: no state was kept for it, so the
    next turn is the whole conversation, and its log-probs are as exact as with kept state."""
    import rollout.scheduler as scheduler

    monkeypatch.setattr(scheduler, "_may_continue", lambda ep: False)  # every turn looks like the last
    engine = TorchEngine(policy, max_batch=8, max_len=512, seed=0)
    got = _run(engine, policy.tokenizer, [_prompt("test/scripted-tool-use", 1)], group_size=2)
    assert got[0][1].metadata["failed"] == [] and got[0][1].metadata["turns"] == [3, 3]
    for s in got[0][1].samples:
        with torch.no_grad():
            logits = policy.model(torch.tensor(s.token_ids[None], dtype=torch.long)).logits
        full, _ = logprobs_from_logits(logits, torch.tensor(s.token_ids[None], dtype=torch.long), 0.7)
        own = s.loss_mask == POLICY
        assert np.abs(full[0].numpy()[own] - s.logprobs[own]).max() < 1e-4
    assert len(engine.free) == 8 and not engine.has_work()
