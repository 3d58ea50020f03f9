"""Each built-in family: references score 1, corrupted answers 0, datasets load, episodes run."""

from __future__ import annotations

import asyncio
import json
import random
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

import environments
from environments import DatasetError, Generation
from environments.code_env import extract_program

FAMILIES = ["estuary/math", "estuary/code", "estuary/tool_use", "estuary/long_context"]


def _play(env, responder) -> tuple[float, dict, int]:
    turns = 0
    while True:
        _, reward, terminated, truncated, info = env.step(responder(env))
        turns += 1
        if terminated or truncated:
            return reward, info, turns


def _make(env_id: str, **kwargs):
    if env_id == "estuary/long_context":
        kwargs.setdefault("length_tokens", 1024)
    return environments.make(env_id, **kwargs)


@pytest.mark.parametrize("env_id", FAMILIES)
@pytest.mark.parametrize("difficulty", [0, 1, 2, 3])
def test_reference_scores_one_and_corruption_zero(env_id, difficulty):
    env = _make(env_id, difficulty=difficulty)
    for seed in range(4):
        messages, info = env.reset(seed=seed)
        assert messages[-1]["role"] == "user" and messages[-1]["content"]
        reward, info, _ = _play(env, lambda e: e.reference_answer())
        assert reward == 1.0, (env_id, seed, info)
        assert info["reward_breakdown"]["correct"] == 1.0
        env.reset(seed=seed)
        reward, info, _ = _play(env, lambda e: "<think>guess</think> \\boxed{-31337}")
        assert reward == 0.0, (env_id, seed, info)


@pytest.mark.parametrize("env_id", FAMILIES)
def test_seeds_are_reproducible_and_varied(env_id):
    env = _make(env_id)
    first = [env.reset(seed=s)[0][-1]["content"] for s in range(6)]
    again = [env.reset(seed=s)[0][-1]["content"] for s in range(6)]
    assert first == again
    assert len(set(first)) >= 4


def test_tool_use_is_multi_turn_and_bounded():
    env = environments.make("estuary/tool_use", difficulty=2)
    env.reset(seed=3)
    reward, info, turns = _play(env, lambda e: e.reference_answer())
    assert turns == 4 and reward == 1.0  # lookup, lookup, calculator, answer
    env.reset(seed=3)
    _, reply, *_ = None, *env.step('<tool_call>{"name": "lookup", "arguments": {"title": "x"}}</tool_call>')[:1]
    assert reply[0]["role"] == "tool" and "<tool_response>" in reply[0]["content"]
    env = environments.make("estuary/tool_use", difficulty=2, max_turns=2)
    env.reset(seed=3)
    reward, info, turns = _play(env, lambda e: e.reference_answer())
    assert turns == 2 and info["verdict"] == "truncated" and reward == 0.0


def test_tool_use_penalises_malformed_calls():
    env = environments.make("estuary/tool_use", difficulty=0)
    env.reset(seed=1)
    env.step("<tool_call>{not json</tool_call>")
    env.step('<tool_call>{"name": "teleport", "arguments": {}}</tool_call>')
    _, reward, done, _, info = env.step(f"\\boxed{{{env.task.answer}}}")
    assert done and reward == pytest.approx(0.8)
    assert info["reward_breakdown"]["penalty"] == pytest.approx(-0.2)


def test_tool_use_partial_credit_pays_only_a_lookup_of_a_needed_title():
    env = environments.make("estuary/tool_use", difficulty=2, partial_credit=True, max_turns=4)
    env.reset(seed=3)
    a, b = [args["title"] for name, args in env.task.data["plan"] if name == "lookup"]
    other = next(t for t in env.task.data["store"] if t not in (a, b))

    def wrong_after(*calls):
        env.reset(seed=3)
        for call in calls:
            env.step(call)
        _, reward, done, _, info = env.step("\\boxed{-1}")
        assert done and info["verdict"] == "wrong"
        return reward

    lookup = '<tool_call>{{"name": "lookup", "arguments": {{"title": "{}"}}}}</tool_call>'.format
    assert wrong_after() == 0.0
    assert wrong_after(lookup(a)) == pytest.approx(0.15)
    assert wrong_after(lookup(a), lookup(b)) == pytest.approx(0.3)
    assert wrong_after(lookup(other), lookup(other)) == 0.0  # a document the question does not need
    # a search returns documents too, but matches any text (an empty query returns three)
    assert wrong_after('<tool_call>{"name": "search", "arguments": {"query": ""}}</tool_call>') == 0.0
    env.reset(seed=3)
    assert _play(env, lambda e: e.reference_answer())[0] == 1.0  # a right answer still earns 1
    plain = environments.make("estuary/tool_use", difficulty=2, max_turns=4)
    plain.reset(seed=3)
    plain.step(lookup(a))
    assert plain.step("\\boxed{-1}")[1] == 0.0  # off by default


def test_tool_use_tools_work():
    env = environments.make("estuary/tool_use")
    env.reset(seed=0)
    assert env.call_tool("calculator", {"expression": "(2 + 3) * 4 ** 2"}) == "80"
    with pytest.raises(ValueError):
        env.call_tool("calculator", {"expression": "__import__('os').system('x')"})
    assert env.call_tool("python", {"code": "print(6 * 7)"}).strip() == "42"
    name = next(iter(env.task.data["store"]))
    assert name in env.call_tool("search", {"query": name.lower()})


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_math_jsonl_gsm8k_and_math_forms(tmp_path):
    rows = [{"problem": "Natalia sold 48 clips and then half as many. Total?",
             "answer": "48 / 2 = 24\n48 + 24 = 72\n#### 72"},
            {"problem": "Simplify 2/4.", "answer": "\\frac{1}{2}"},
            {"problem": "Find x.", "answer": "The value is $\\boxed{\\sqrt{2}}$."}]
    env = environments.make("estuary/math", dataset=_write_jsonl(tmp_path / "m.jsonl", rows))
    for i, good in enumerate(["\\boxed{72}", "\\boxed{0.5}", "\\boxed{\\sqrt{2}}"]):
        env.reset(options={"index": i})
        assert env.step(good)[1] == 1.0
        env.reset(options={"index": i})
        assert env.step(env.reference_answer())[1] == 1.0
    env.reset(seed=5)  # a plain seed samples a row
    assert env.task.answer in {"72", "\\frac{1}{2}", "\\sqrt{2}"}


def test_code_jsonl_humaneval_and_mbpp(tmp_path):
    he = {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n",
          "canonical_solution": "    return a + b\n",
          "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n", "entry_point": "add"}
    mbpp = {"text": "Write a function to square a number.", "code": "def sq(x):\n    return x * x",
            "test_list": ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(-1) == 1"]}
    env = environments.make("estuary/code", dataset=_write_jsonl(tmp_path / "c.jsonl", [he, mbpp]),
                            partial_credit=True)
    env.reset(options={"index": 0})
    assert env.step("```python\n    return a + b\n```")[1] == 1.0  # a body continuing the prompt
    env.reset(options={"index": 0})
    assert env.step("```python\ndef add(a, b):\n    return a + b\n```")[1] == 1.0
    env.reset(options={"index": 0})
    assert env.step(env.reference_answer())[1] == 1.0
    env.reset(options={"index": 1})
    _, reward, _, _, info = env.step("def sq(x):\n    return abs(x) * 2")
    assert reward == pytest.approx(1 / 3) and info["tests_passed"] == 1  # only sq(2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(DatasetError, match="HumanEval"):
        environments.make("estuary/code", dataset=str(bad))


def test_code_verdicts_carry_the_error():
    env = environments.make("estuary/code")
    env.reset(seed=0)
    cases = {
        "passed": env.reference_answer(),
        "failed": "```python\ndef add_k(x):\n    return 0\ndef times_k(x):\n    return 0\ndef max2(a, b):\n    return 0\n```",
        "syntax_error": "```python\ndef oops(:\n```",
        "timeout": "```python\nwhile True:\n    pass\n```",
        "sandbox_violation": "```python\nx = bytearray(1 << 34)\n```",
    }
    env.limits = type(env.limits)(wall_s=2, cpu_s=2)
    for verdict, answer in cases.items():
        env.reset(seed=0)
        _, _, _, _, info = env.step(answer)
        assert info["verdict"] == verdict, (verdict, info)
        if verdict != "passed":
            assert info["error"]


def test_extract_program_prefers_fenced_block():
    assert extract_program("<think>x</think>Here:\n```python\nprint(1)\n```\nbye") == "print(1)"
    assert extract_program("def f():\n    return 1") == "def f():\n    return 1"


def test_long_context_lengths_and_tasks():
    for task in ("niah_single", "niah_multi", "multikey", "variable_tracking", "aggregation"):
        env = environments.make("estuary/long_context", task=task, length_tokens=32_000)
        messages, _ = env.reset(seed=1)
        n_chars = len(messages[-1]["content"])
        assert 0.9 * 128_000 < n_chars < 1.1 * 128_000
        assert env.step(env.reference_answer())[1] == 1.0
    env = environments.make("estuary/long_context", task="niah_multi")
    env.reset(seed=2)
    partial = "\\boxed{" + env.task.answer[0] + "}"
    _, reward, _, _, info = env.step(partial)
    assert reward == pytest.approx(0.5) and info["verdict"] == "partial"  # F1 of 1 of 3


def test_long_context_dataset_rows(tmp_path):
    rows = [{"context": "The code is 4417.", "question": "What is the code?", "answer": "4417"}]
    env = environments.make("estuary/long_context", dataset=_write_jsonl(tmp_path / "l.jsonl", rows))
    env.reset(options={"index": 0})
    assert env.step("\\boxed{4417}")[1] == 1.0


def test_generation_facts_reach_shaping_rewards():
    env = environments.make("estuary/math", rewards=["format", "overlong"], max_tokens=100)
    env.reset(seed=0)
    _, reward, *_, info = env.step(Generation(text=env.reference_answer(), tokens=90))
    parts = info["reward_breakdown"]
    assert parts["format"] == pytest.approx(0.1)
    assert parts["overlong"] == pytest.approx((75 - 90) / 25)
    assert reward == pytest.approx(1.0 + 0.1 - 0.6)


def _episode(args) -> float:
    env_id, seed = args
    env = _make(env_id)
    env.reset(seed=seed)
    return _play(env, lambda e: e.reference_answer())[0]


def test_many_episodes_at_once_in_threads_and_asyncio():
    jobs = [(env_id, seed) for env_id in FAMILIES for seed in range(6)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(_episode, jobs)) == [1.0] * len(jobs)

    async def main():
        return await asyncio.gather(*(asyncio.to_thread(_episode, j) for j in jobs))

    assert asyncio.run(main()) == [1.0] * len(jobs)


def test_step_before_reset_and_bad_index():
    env = environments.make("estuary/math")
    with pytest.raises(RuntimeError, match="reset"):
        env.step("x")


def test_long_context_value_digits_sets_the_needles_length():
    for digits in (4, 7):
        env = environments.make("estuary/long_context", task="niah_single", length_tokens=128,
                                value_digits=digits)
        env.reset(seed=5)
        [value] = env.task.answer
        assert len(value) == digits and value in env.task.prompt
        assert env.step(env.reference_answer())[1] == 1.0
    with pytest.raises(ValueError, match="value_digits"):
        environments.make("estuary/long_context", value_digits=2)


def test_code_templates_pick_task_families_by_name():
    env = environments.make("estuary/code", templates=["max2", "fib"])
    names = set()
    for seed in range(40):
        env.reset(seed=seed)
        names.add(env.task.data["entry_point"])
    assert names == {"max2", "fib"}
    with pytest.raises(ValueError, match="unknown templates \\['max3'\\]; choose from"):
        environments.make("estuary/code", templates=["max3"])


def test_reference_thoughts_quote_the_context_that_holds_the_answer():
    # multikey: only the asked key's line, never a decoy's (the quote is what SFT teaches to copy)
    env = environments.make("estuary/long_context", task="multikey", length_tokens=256, value_digits=4)
    env.reset(seed=3)
    thought = env.reference_answer().split("</think>")[0].removeprefix("<think>")
    [value] = env.task.answer
    assert thought.endswith(f" is {value}.") and thought in env.task.prompt
    assert thought.count("special magic number") == 1
    # tool_use: the call turn restates the question's words, the answer turn quotes the page
    env = environments.make("estuary/tool_use", max_turns=3)
    messages, _ = env.reset(seed=5)
    attr, title = env.task.data["attr"], env.task.data["plan"][0][1]["title"]
    first = env.reference_answer()
    assert first.startswith(f"<think>The {attr} of {title}.</think><tool_call>")
    reply, *_ = env.step(first)
    answer = env.reference_answer()
    quote = answer.split("</think>")[0].removeprefix("<think>")
    assert quote in reply[0]["content"] and quote.endswith(str(env.task.answer))


def test_math_kinds_pick_problem_families_and_count_on_steps_by_one_or_ten():
    env = environments.make("estuary/math", kinds=["count_on"])
    steps = set()
    for seed in range(40):
        messages, _ = env.reset(seed=seed)
        a, op, k = messages[-1]["content"].split(".")[0].removeprefix("Compute ").split()
        steps.add(k)
        assert 10 <= int(a) <= 89 and env.unwrapped.task.answer == str(int(a) + int(k) * (1 if op == "+" else -1))
        reward, _, _ = _play(env, lambda e: e.reference_answer())
        assert reward == 1.0
    assert steps == {"1", "10"}
    mixed = environments.make("estuary/math", kinds=["count_on", "word"])
    prompts = [mixed.reset(seed=s)[0][-1]["content"] for s in range(20)]
    assert any("has" in p for p in prompts) and any(p.startswith("Compute") for p in prompts)
    with pytest.raises(ValueError, match="unknown kinds \\['nope'\\]; choose from"):
        environments.make("estuary/math", kinds=["nope"])


def test_math_quote_quotes_a_sum_and_boxes_its_result_and_changes_nothing_else():
    plain, quoted = environments.make("estuary/math"), environments.make("estuary/math", quote=True)
    forms = set()
    for seed in range(40):
        first, second = plain.reset(seed=seed)[0], quoted.reset(seed=seed)[0]
        assert first == second and plain.unwrapped.task.answer == quoted.unwrapped.task.answer
        before = plain.unwrapped.reference_answer()
        after = quoted.unwrapped.reference_answer()
        a, op, b, c = re.fullmatch(r"<think>(\d+) ([+-]) (\d+) = (-?\d+)</think>\n.*", before, re.S).groups()
        # a word problem's sum is written as `Compute a op b` too: the form drills teach
        assert after == before.replace(f"{a} {op} {b} = {c}", f"Compute {a} {op} {b} = \\boxed{{{c}}}")
        forms.add(first[-1]["content"].startswith("Compute"))
        reward, _, _ = _play(quoted, lambda e: e.reference_answer())
        assert reward == 1.0  # the box in the thought is not graded: the answer after `</think>` is
    assert forms == {True, False}  # both arithmetic and word problems were seen
    for kwargs in ({"kinds": ["algebra"]}, {"kinds": ["largest"]}, {"kinds": ["arithmetic"], "difficulty": 2}):  # no one-step sums
        plain, quoted = environments.make("estuary/math", **kwargs), environments.make("estuary/math", quote=True, **kwargs)
        for seed in range(20):
            plain.reset(seed=seed), quoted.reset(seed=seed)
            assert plain.unwrapped.reference_answer() == quoted.unwrapped.reference_answer()


def test_math_largest_asks_for_the_largest_listed_number_and_pays_only_for_it():
    env = environments.make("estuary/math", kinds=["largest"])
    sizes = set()
    for seed in range(40):
        messages, _ = env.reset(seed=seed)
        listed = messages[-1]["content"].split("?")[0].removeprefix("Which is the largest of ")
        numbers = [int(n) for n in listed.split(", ")]
        sizes.add(len(numbers))
        assert len(set(numbers)) == len(numbers) and all(10 <= n <= 99 for n in numbers)
        assert env.unwrapped.task.answer == str(max(numbers))
        assert _play(env, lambda e: e.reference_answer())[0] == 1.0
        env.reset(seed=seed)  # the grader must not compute the largest for the policy
        hack = f"\\boxed{{\\max({listed})}}"
        assert _play(env, lambda e, hack=hack: hack)[0] == 0.0
        env.reset(seed=seed)  # nor take the last of a restated list
        restated = " ".join(map(str, sorted(numbers)))
        assert _play(env, lambda e, restated=restated: restated)[0] == 0.0
    assert sizes == {3, 4, 5}
    weighted = environments.make("estuary/math", kinds=["word", "largest", "largest"])
    prompts = [weighted.reset(seed=s)[0][-1]["content"] for s in range(300)]
    share = sum(p.startswith("Which is the largest") for p in prompts) / len(prompts)
    assert 0.58 < share < 0.75  # a name listed twice is drawn twice as often


# -- answers that do no work ------------------------------------------------------------------------
def _passes(tests: list[str], name: str, fn) -> int:
    passed = 0
    for test in tests:
        try:
            exec(test, {name: fn})  # noqa: S102 - our own generated asserts
            passed += 1
        except AssertionError:
            pass
    return passed


def test_no_generated_task_is_passed_whole_by_an_answer_that_does_no_work():
    """max2's four pairs all had a >= b in 15% of instances (`return a` passed), is_prime's five
    numbers were all composite in 23% (`return False`), count_char's letter was 'i' in 20% and no
    word held one (`return 0`)."""
    from environments.code_tasks import TEMPLATES

    lazy = [lambda *a, c=c: c for c in (0, 1, -1, True, False, None, "", [], ())]
    lazy += [lambda *a, i=i: a[i] for i in range(2)]
    for template in TEMPLATES:
        for seed in range(150):
            spec = template.build(random.Random(seed))
            for fn in lazy:
                try:
                    passed = _passes(spec["tests"], spec["name"], fn)
                except IndexError:  # a one-argument function has no a[1]
                    continue
                assert passed < len(spec["tests"]), (template.name, seed, spec["tests"])


def test_partial_credit_pays_only_above_an_answer_that_does_no_work():
    env = environments.make("estuary/code", templates=["max2"], partial_credit=True)
    for seed in range(6):  # `return a` earned 0.46 a task here before: the tests it happens to pass
        env.reset(seed=seed)
        _, reward, _, _, info = env.step("```python\ndef max2(a, b):\n    return a\n```")
        assert reward == 0.0 and 0 < info["tests_passed"] < info["tests_total"]
    env = environments.make("estuary/code", templates=["add_k"], partial_credit=True)
    paid = []
    for seed in range(12):  # an honest answer that is right for part of the inputs is still paid
        env.reset(seed=seed)
        k = int(env.task.answer.rsplit("+", 1)[1])
        _, reward, _, _, info = env.step(f"```python\ndef add_k(x):\n    return abs(x) + {k}\n```")
        share, floor = info["tests_passed"] / info["tests_total"], env.task.data["trivial_share"]
        assert reward == pytest.approx(max(0.0, (share - floor) / (1 - floor)) if share < 1 else 1.0)
        paid.append(reward)
    assert any(0 < r < 1 for r in paid)
