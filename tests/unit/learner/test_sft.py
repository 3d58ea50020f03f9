"""Warm-start SFT: reference conversations, cut thinking, and a loss that goes down."""

from __future__ import annotations

import random

from configs.schema import EnvironmentConfig, SftConfig
from learner.sft import cut_thinking, reference_conversation, run_sft
from models.policy import write_preset
from models.tokenizer import build_tokenizer
from rollout.worker import env_factory


def test_cut_thinking_keeps_a_prefix_of_the_thought_and_the_whole_answer():
    tok = build_tokenizer()
    text = "<think>9 + 8 = 17, carry the one</think>\\nThe answer is \\\\boxed{17}."
    cuts = {cut_thinking(text, tok, random.Random(seed)) for seed in range(20)}
    assert len(cuts) > 3
    for cut in cuts:
        thought, answer = cut.split("</think>")
        assert "9 + 8 = 17, carry the one".startswith(thought.removeprefix("<think>"))
        assert answer == text.split("</think>")[1]
    assert cut_thinking("no thinking here", tok, random.Random(0)) == "no thinking here"


def test_tool_use_reference_conversation_masks_only_the_assistant_turns():
    tok = build_tokenizer()
    env = env_factory(EnvironmentConfig(id="estuary/tool_use", kwargs={"difficulty": 0}))()
    ids, mask = reference_conversation(env, tok, seed=3, rng=random.Random(0), cut=0.0)
    text = tok.decode(ids)
    assert "<tool_call>" in text and "<tool_response>" in text and "boxed" in text
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert "<tool_call>" in trained and "<tool_response>" not in trained  # tool output is not trained on
    assert mask.count(1) < len(mask) and ids.count(tok.eos_token_id) >= 3


def test_sft_lowers_the_loss_and_saves_the_policy(tmp_path):
    write_preset("tiny-hybrid-moe", tmp_path / "p", seed=0)
    before = (tmp_path / "p/model.safetensors").read_bytes()
    envs = {"math": EnvironmentConfig(id="estuary/math", kwargs={"difficulty": 0})}
    result = run_sft(tmp_path / "p", SftConfig(steps=30, lr=3e-3, batch_size=8, cut_fraction=0.3), envs)
    assert result.loss_end < result.loss_start - 1.0
    assert (tmp_path / "p/model.safetensors").read_bytes() != before
