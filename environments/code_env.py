"""`estuary/code`: write a Python function; unit tests run in the sandbox.

Generated tasks come from parameterised templates (difficulty 0: one-line arithmetic functions,
up to 3: loops over lists and strings). Datasets in HumanEval form (`task_id`, `prompt`,
`canonical_solution`, `test`, `entry_point`) or MBPP form (`text`, `code`, `test_list`) are
detected per row. The program is the first fenced python block of the answer (else the bare text
after `</think>`); a HumanEval answer without `def <entry_point>` is taken as the body that
continues the prompt. Reward: 1 if every test passes, or the fraction passed (`partial_credit`).
"""

from __future__ import annotations

import json
import random
import re
import secrets
from typing import Any

from environments.base import DatasetError, Task, TextEnv, TurnResult
from environments.code_tasks import TEMPLATES
from environments.sandbox import Limits, SandboxPool, default_pool, violation_reason

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S)

_HARNESS = """
import json, sys
_TESTS = json.loads({tests!r})
_g = {{"__name__": "__solution__"}}
try:
    exec(compile(open("solution.py").read(), "solution.py", "exec"), _g)
except SyntaxError as e:
    print({nonce!r} + json.dumps({{"stage": "syntax", "error": repr(e)}}), flush=True)
    sys.exit(0)
except BaseException as e:
    print({nonce!r} + json.dumps({{"stage": "load", "error": repr(e)[:500]}}), flush=True)
    sys.exit(0)
_passed, _errors = 0, []
for _i, _t in enumerate(_TESTS):
    try:
        exec(compile(_t, f"test_{{_i}}", "exec"), _g)
        _passed += 1
    except BaseException as e:
        _errors.append(f"test {{_i}}: {{e!r}}"[:300])
print({nonce!r} + json.dumps({{"stage": "tests", "passed": _passed, "errors": _errors}}), flush=True)
"""


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
                 pool: SandboxPool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.partial_credit = partial_credit
        self.limits = Limits(wall_s=wall_s, cpu_s=max(1, int(wall_s)))
        self.pool = pool

    def generate(self, rng: random.Random) -> Task:
        eligible = [t for t in TEMPLATES if t.level <= self.difficulty]
        template = rng.choice(eligible)
        spec = template.build(rng)
        prompt = (f"Write a Python function `{spec['signature']}` that {spec['description']}. "
                  "Reply with the code in a ```python block.")
        return Task(prompt=prompt, answer=spec["solution"],
                    data={"tests": spec["tests"], "prefix": "", "entry_point": spec["name"]})

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
        verdict, passed, detail = self.run_tests(self.program_for(action), self.task.data["tests"])
        total = len(self.task.data["tests"])
        correct = passed / total if self.partial_credit else float(passed == total)
        return TurnResult(done=True, correct=correct, verdict=verdict,
                          detail={"tests_passed": passed, "tests_total": total, **detail})

    def run_tests(self, program: str, tests: list[str]) -> tuple[str, int, dict[str, Any]]:
        """(verdict, tests passed, detail) for `program` against `tests`, in the sandbox."""
        nonce = f"@@estuary-{secrets.token_hex(8)}@@"
        harness = _HARNESS.format(tests=json.dumps(tests), nonce=nonce)
        result = (self.pool or default_pool()).run(harness, self.limits, files={"solution.py": program})
        report = None
        for line in result.stdout.splitlines():
            if line.startswith(nonce):
                report = json.loads(line[len(nonce):])
        if result.verdict in ("timeout", "sandbox_violation"):
            return result.verdict, 0, {"error": result.reason}
        if report is None:
            return "failed", 0, {"error": (result.stderr.strip().splitlines() or ["no result"])[-1]}
        if report["stage"] == "syntax":
            return "syntax_error", 0, {"error": report["error"]}
        error = report["error"] if report["stage"] == "load" else "; ".join(report["errors"])[:1000]
        passed = report.get("passed", 0)
        reason = violation_reason(error)
        if reason:  # a limit hit inside the harness (MemoryError, fork refused, ...)
            return "sandbox_violation", passed, {"error": f"{reason}: {error}"}
        verdict = "passed" if passed == len(tests) else "failed"
        return verdict, passed, {"error": error}

    def reference_turn(self) -> str:
        assert self.task is not None
        body = self.task.answer
        return f"<think>Write the function.</think>\n```python\n{body.rstrip()}\n```"
