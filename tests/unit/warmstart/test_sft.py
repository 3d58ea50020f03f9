"""Warm-start SFT: reference conversations, cut thinking, and a loss that goes down."""

from __future__ import annotations

import random
import re

import torch

from configs.schema import EnvironmentConfig, SftConfig
from environments import env_factory
from models.policy import init_policy, write_preset
from models.tokenizer import build_tokenizer
from warmstart.sft import (
    _batch,
    accumulate,
    cut_thinking,
    reference_conversation,
    run_sft,
    sft_loss,
    thought_tokens,
)


def test_cut_thinking_keeps_the_budgets_prefix_of_the_thought_and_the_whole_answer():
    tok = build_tokenizer()
    text = "<think>9 + 8 = 17, carry the one</think>\\nThe answer is \\\\boxed{17}."
    length = thought_tokens(text, tok)
    cuts = [cut_thinking(text, tok, budget) for budget in range(length + 3)]
    assert len(set(cuts)) > 3 and cuts[length:] == [text] * 3  # a thought within its budget is untouched
    for budget, cut in enumerate(cuts):
        thought, answer = cut.split("</think>")
        assert "9 + 8 = 17, carry the one".startswith(thought.removeprefix("<think>"))
        assert thought_tokens(cut, tok) == min(budget, length)
        assert answer == text.split("</think>")[1]
    assert cut_thinking("no thinking here", tok, 0) == "no thinking here"


def _prompt_and_thought(tok, ids, mask):
    prompt = tok.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    answer = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    return prompt, thought_tokens(answer, tok)


def test_reference_conversations_state_their_budget_and_close_the_thought_there():
    tok = build_tokenizer()
    env = env_factory(EnvironmentConfig(id="estuary/math", kwargs={"difficulty": 0}))()
    env.reset(seed=5)
    full = thought_tokens(env.reference_answer(), tok)
    assert full > 2
    for seed in range(6):  # `cut`: a budget below the thought, stated, and the thought cut at it
        rng = random.Random(seed)
        prompt, thought = _prompt_and_thought(tok, *reference_conversation(env, tok, 5, rng, cut=1.0))
        budget = int(re.search(r"Thinking budget: (\d+) tokens\.", prompt)[1])
        assert budget < full and thought == budget
    for seed in range(6):  # otherwise a budget drawn like the rollouts', cutting only a longer thought
        prompt, thought = _prompt_and_thought(tok, *reference_conversation(env, tok, 5, random.Random(seed),
                                                                           cut=0.0, budget=(2, full + 4)))
        budget = int(re.search(r"Thinking budget: (\d+) tokens\.", prompt)[1])
        assert 2 <= budget <= full + 4 and thought == min(budget, full)
    prompt, thought = _prompt_and_thought(tok, *reference_conversation(env, tok, 5, random.Random(0), cut=0.0))
    assert "Thinking budget" not in prompt and thought == full  # no budget in the run: none shown, none cut


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


def test_copy_rows_join_every_sft_batch(tmp_path):
    envs = {"math": EnvironmentConfig(id="estuary/math", kwargs={"difficulty": 0})}
    weights = {}
    for rows in (0, 4):
        write_preset("tiny-hybrid-moe", tmp_path / str(rows), seed=0)
        run_sft(tmp_path / str(rows), SftConfig(steps=2, lr=3e-3, batch_size=2, copy_rows=rows), envs)
        weights[rows] = (tmp_path / str(rows) / "model.safetensors").read_bytes()
    assert weights[0] != weights[4]  # same seed and reference rows: only the copy rows differ


def test_length_sorted_micro_batches_give_the_one_batch_gradient():
    policy = init_policy("tiny-hybrid-moe", seed=0)
    model, tok = policy.model, policy.tokenizer
    rng = random.Random(0)
    rows = []
    for env_id in ("estuary/math", "estuary/tool_use", "estuary/code", "estuary/long_context"):
        env = env_factory(EnvironmentConfig(id=env_id, kwargs={"difficulty": 0}))()
        rows += [reference_conversation(env, tok, seed, rng, cut=0.3) for seed in range(2)]
    assert max(len(r[0]) for r in rows) > 2 * min(len(r[0]) for r in rows)  # lengths differ a lot

    def grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn()
        return loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    def one_batch():
        loss = sft_loss(model, *_batch(rows, tok.pad_token_id))
        loss.backward()
        return loss.item()

    loss_one, g_one = grads(one_batch)
    loss_acc, g_acc = grads(lambda: accumulate(model, rows, tok.pad_token_id, micro_rows=3))
    assert abs(loss_one - loss_acc) < 1e-5 * loss_one
    assert len(g_one) == len(g_acc)
    for a, b in zip(g_one, g_acc, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_single_turn_references_are_not_scored(monkeypatch):
    tok = build_tokenizer()
    env = env_factory(EnvironmentConfig(id="estuary/code", kwargs={"difficulty": 0}))()
    monkeypatch.setattr(env, "step", lambda *a, **k: (_ for _ in ()).throw(AssertionError("scored")))
    ids, mask = reference_conversation(env, tok, seed=1, rng=random.Random(0), cut=0.0)
    assert "def " in tok.decode([i for i, m in zip(ids, mask, strict=True) if m])


def _arithmetic_thought(a: int, op: str, b: int) -> str:
    """The math environment's reference thought for `Compute a op b.` (difficulty 0, quoted)."""
    env = env_factory(EnvironmentConfig(id="estuary/math", kwargs={"kinds": ["arithmetic"], "quote": True}))()
    for seed in range(5000):
        env.reset(seed=seed)
        if env.task.prompt.startswith(f"Compute {a} {op} {b}."):
            return env.reference_answer().split("<think>")[1].split("</think>")[0]
    raise AssertionError(f"no seed below 5000 draws Compute {a} {op} {b}.")


def test_drill_rows_state_true_facts_and_train_only_their_results():
    from warmstart.drills import drill_row

    tok = build_tokenizer()
    ids, mask = drill_row(tok, random.Random(3), facts=48, answered_every=4)
    lines = tok.decode(ids).strip().split("\n")
    assert len(lines) == 48 + 12 and any("{-" in line for line in lines)  # negative results are drilled too
    expected, trained, index = [], [], 0
    while index < len(lines):  # written as the quoting math environment's reference thought writes a sum
        line = lines[index]
        thought = line.removeprefix("<think>").removesuffix("</think>")
        a, op, b, result = re.fullmatch(r"Compute (\d) ([+-]) (\d) = \\boxed\{(-?\d+)\}", thought).groups()
        assert int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert _arithmetic_thought(int(a), op, int(b)) == thought
        item = ("{" if result.startswith("-") else "") + result + "}"  # `{-` is trained whole
        if line.startswith("<think>"):  # every fourth line: the whole reference turn, its answer a copy
            answer = lines[index + 1]
            assert answer == f"The answer is \\boxed{{{result}}}."
            line, index = f"{line}\n{answer}", index + 1
            item += item[:-1] + "}."  # the copy's `}.` is one token
        expected += tok.encode(line + "\n", add_special_tokens=False)  # the tokens the thought has (`{-` is one)
        trained.append(item)
        index += 1
    assert ids == expected
    assert "".join(tok.decode([i for i, m in zip(ids, mask, strict=True) if m])) == "".join(trained)
    assert sum(line.startswith("<think>") for line in lines) == 12


def test_answer_rows_train_only_the_answers_copy_of_the_thoughts_last_value():
    from warmstart.drills import ANSWER_SLOTS, answer_row

    tok = build_tokenizer()
    ids, mask = answer_row(tok, random.Random(5), lines=40)
    lines = re.findall(r"<think>(.*?) (\w+)\.</think>\n?(.*)", tok.decode(ids))
    assert len(lines) == 40
    trained, gaps = [], 0
    for words, value, answer in lines:
        opening, closing = next((o, c) for o, c in ANSWER_SLOTS if answer.endswith(value + c)
                                and re.search(re.escape(o).replace("KEY", "[a-z]+") + "$", answer[:-len(value + c)]))
        gap = re.sub(re.escape(opening).replace("KEY", "[a-z]+") + "$", "", answer.removesuffix(value + closing))
        assert re.fullmatch(r"[a-z ]*", words + gap)  # random letters: no task's text
        gaps += bool(gap.strip())
        trained.append(value + closing)
    assert gaps > 10  # some slots come after other words, as a call's title does
    assert len({value for _, value, _ in lines}) == 40  # random values, numbers and words alike
    assert any(v.isdigit() for _, v, _ in lines) and any(v.isalpha() for _, v, _ in lines)
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "".join(trained)


def test_the_sft_rate_warms_up_then_decays_to_a_tenth():
    from warmstart.sft import sft_lr

    plain = SftConfig(steps=100, lr=1e-3)
    assert sft_lr(plain, 0) == 1e-3 and abs(sft_lr(plain, 100) - 1e-4) < 1e-12
    warm = SftConfig(steps=100, lr=1e-3, warmup_steps=10)
    assert abs(sft_lr(warm, 0) - 1e-4) < 1e-12  # a tenth of the way up
    assert abs(sft_lr(warm, 9) - sft_lr(plain, 9)) < 1e-12  # warm from step 9 on
    assert [sft_lr(warm, s) for s in range(10)] == sorted(sft_lr(warm, s) for s in range(10))
