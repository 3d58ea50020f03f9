"""`estuary/code`: write a Python function; unit tests run in the sandbox.

Generated tasks come from parameterised templates (difficulty 0: one-line arithmetic functions,
up to 3: loops over lists and strings; `templates=[...]` picks families by name). Datasets in
HumanEval form (`task_id`, `prompt`, `canonical_solution`, `test`, `entry_point`) or MBPP form
(`text`, `code`, `test_list`) are detected per row. The program is the first fenced python
block of the answer (else the bare text after `</think>`); a HumanEval answer without
`def <entry_point>` is taken as the body that continues the prompt. Reward: 1 if every test passes; with `partial_credit`, the share passed above the share an answer doing no work passes (a constant, or an argument handed back), scaled to 0..1.

The tests never run beside the answer: the answer runs alone in the sandbox and the tests run in
this process, calling it through a pipe that carries plain data only (`isolated_tests`).
Verdicts: passed, failed, syntax_error, timeout, sandbox_violation, and the hack-like
`HACK_VERDICTS` (bad_result, escaped_exception, exited, protocol_violation).
"""

from __future__ import annotations

import random
import re
from typing import Any

from environments.base import DatasetError, Task, TextEnv, TurnResult
from environments.code_tasks import TEMPLATES
from environments.isolated_tests import HACK_VERDICTS, run_isolated
from environments.sandbox import Limits, SandboxPool, default_pool

__all__ = ["HACK_VERDICTS", "CodeEnv", "detect_format", "extract_program"]  # code's hack-like verdicts

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S)

def extract_program(answer: str) -> str:
    """The code in a response: the first fenced block, else the text after the thinking."""
    text = answer.rsplit("</think>", 1)[-1]
    match = _FENCE.search(text)
    return (match.group(1) if match else text).strip("\n")


def detect_format(row: dict[str, Any]) -> str:
    if {"prompt", "test", "entry_point"} <= row.keys():
        return "humaneval"
    if {"text", "test_list"} <= row.keys():
        return "mbpp"
    raise DatasetError(
        "code rows need HumanEval keys (task_id, prompt, canonical_solution, test, entry_point) "
        f"or MBPP keys (text, code, test_list); got {sorted(row)}"
    )


class CodeEnv(TextEnv):
    """Python function tasks checked by unit tests in the sandbox."""

    description = "Python function tasks (generated, or HumanEval/MBPP JSONL); unit tests in the sandbox"

    def __init__(self, partial_credit: bool = False, wall_s: float = 10.0,
                 pool: SandboxPool | None = None, templates: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.partial_credit = partial_credit
        known = {t.name: t for t in TEMPLATES}
        unknown = sorted(set(templates or ()) - set(known))
        if unknown:
            raise ValueError(f"estuary/code: unknown templates {unknown}; choose from {sorted(known)}")
        # `templates` narrows generated tasks to these families (any difficulty); default: every
        # template up to `difficulty`.
        self.templates = ([known[n] for n in templates] if templates
                          else [t for t in TEMPLATES if t.level <= self.difficulty])
        self.limits = Limits(wall_s=wall_s, cpu_s=max(1, int(wall_s)))
        self.pool = pool

    def generate(self, rng: random.Random) -> Task:
        template = rng.choice(self.templates)
        spec = template.build(rng)
        prompt = (f"Write a Python function `{spec['signature']}` that {spec['description']}. "
                  "Reply with the code in a ```python block.")
        return Task(prompt=prompt, answer=spec["solution"],
                    data={"tests": spec["tests"], "prefix": "", "entry_point": spec["name"],
                          "trivial_share": spec["trivial_share"]})

    def check_row(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            detect_format(row)
        except DatasetError as e:
            raise DatasetError(f"code row {index}: {e}") from None
        return row

    def from_row(self, row: dict[str, Any]) -> Task:
        if detect_format(row) == "humaneval":
            tests = [f"{row['test']}\ncheck({row['entry_point']})"]
            prompt = ("Complete this Python function. Reply with the code in a ```python block.\n\n"
                      f"```python\n{row['prompt']}```")
            return Task(prompt=prompt, answer=row.get("canonical_solution", ""),
                        data={"tests": tests, "prefix": row["prompt"],
                              "entry_point": row["entry_point"]})
        setup = row.get("test_setup_code", "")
        tests = [f"{setup}\n{t}" if setup else t for t in row["test_list"]]
        prompt = f"{row['text']} Your code should pass: {row['test_list'][0]}"
        return Task(prompt=prompt, answer=row.get("code", ""),
                    data={"tests": tests, "prefix": "", "entry_point": ""})

    def program_for(self, answer: str) -> str:
        assert self.task is not None
        code = extract_program(answer)
        prefix, entry = self.task.data["prefix"], self.task.data["entry_point"]
        if prefix and not re.search(rf"def\s+{re.escape(entry)}\s*\(", code):
            code = prefix + code  # a HumanEval completion: the body of the prompt's function
        return code

    def score_turn(self, action: str) -> TurnResult:
        assert self.task is not None
        data = self.task.data
        verdict, passed, detail = self.run_tests(self.program_for(action), data["tests"],
                                                 data["prefix"], data["entry_point"])
        total = len(data["tests"])
        correct = float(passed == total)
        if self.partial_credit and passed < total:
            # Only what beats an answer doing no work pays: `return a` passed half of max2's tests,
            # and `return a[0]` earned 0.16 a task at difficulty 0 (0.46 on max2) for nothing.
            floor = data.get("trivial_share", 0.0)  # generated tasks; a dataset's tests are code
            correct = max(0.0, (passed / total - floor) / (1.0 - floor))
        return TurnResult(done=True, correct=correct, verdict=verdict,
                          detail={"tests_passed": passed, "tests_total": total, **detail})

    def run_tests(self, program: str, tests: list[str], prefix: str = "",
                  entry_point: str = "") -> tuple[str, int, dict[str, Any]]:
        """(verdict, tests passed, detail) for `program` against `tests`, isolated from it."""
        outcome = run_isolated(self.pool or default_pool(), self.limits, program, tests,
                               prefix=prefix, entry_point=entry_point)
        return outcome.verdict, outcome.passed, {"error": outcome.error}

    def reference_turn(self) -> str:
        assert self.task is not None
        body = self.task.answer
        return f"<think>Write the function.</think>\n```python\n{body.rstrip()}\n```"
