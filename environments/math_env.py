"""`estuary/math`: generated arithmetic, algebra and word problems, or GSM8K/MATH-style JSONL.

Generated tasks scale with `difficulty` (0: one operation on small numbers, up to 3: multi-step
word problems and larger equations); `kinds=[...]` picks families by name (`arithmetic`,
`algebra`, `word`, `count_on`: adding or taking 1 or 10 from a two-digit number, a step below
difficulty 0 that needs only a digit's successor, carries included, and copying; `largest`: the
largest of 3-5 numbers, comparing place values; a name given twice is drawn twice as often). A dataset
row has `problem` and `answer` (a GSM8K `... #### 72` answer, a number, or MATH LaTeX, possibly
`\\boxed{}`) and an optional `solution`. With `quote=true` a one-step sum's reference thought quotes
the problem and boxes the result (`Compute 5 + 9 = \\boxed{14}` for `5 + 9 = 14`, a word problem's
sum written the same way): a tiny policy copies operands it has just quoted, and the answer's
`\\boxed{` copies the thought's (README, "Session 30" and "Session 34"); it is the form
`sft.drill_rows` drills, so the fact is recalled where it was learned. The reward is answer equivalence
by math-verify (thread-safe here), 1 or 0; hedged answers (several candidates), unevaluated ones (`5 + 9` for
a number) and ones that expand to something huge score 0 (`rewards.math`).
"""

from __future__ import annotations

import random
import re
from typing import Any

from environments.base import DatasetError, Task, TextEnv, TurnResult
from rewards.math import boxed_contents, grade_math

INSTRUCTION = "Think briefly, then give the final answer as \\boxed{...}."
_BOXED = re.compile(r"\\boxed\{")
_SUM = re.compile(r"(-?\d+ [+-] -?\d+) = (-?\d+)")


def _ranges(difficulty: int) -> int:
    return (9, 50, 200, 1000)[min(difficulty, 3)]


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _arithmetic(rng: random.Random, difficulty: int) -> tuple[str, int, str]:
    hi = _ranges(difficulty)
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    op = rng.choice("+-" if difficulty == 0 else "+-*")
    value = _OPS[op](a, b)
    if difficulty >= 2:
        c = rng.randint(1, hi // 10 + 1)
        return f"Compute {a} {op} {b} + {c}.", value + c, f"{a} {op} {b} = {value}, + {c} = {value + c}"
    return f"Compute {a} {op} {b}.", value, f"{a} {op} {b} = {value}"


def _algebra(rng: random.Random, difficulty: int) -> tuple[str, int, str]:
    hi = _ranges(difficulty)
    x = rng.randint(-hi // 4, hi // 4 + 1)
    a = rng.randint(2, 3 + difficulty * 3)
    b = rng.randint(-hi, hi)
    c = a * x + b
    return (
        f"Solve for x: {a}x + {b} = {c}." if b >= 0 else f"Solve for x: {a}x - {-b} = {c}.",
        x,
        f"{a}x = {c} - {b} = {c - b}, x = {c - b} / {a} = {x}",
    )


_ITEMS = ("apples", "books", "coins", "marbles", "stamps", "pencils")
_NAMES = ("Tom", "Ana", "Lee", "Mia", "Raj", "Sam")


def _word(rng: random.Random, difficulty: int) -> tuple[str, int, str]:
    hi = _ranges(difficulty)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(1, hi), rng.randint(1, hi)
    if difficulty == 0 or rng.random() < 0.5:
        return (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                a + b, f"{a} + {b} = {a + b}")
    k = rng.randint(2, 5)
    total = a * k - b
    return (
        f"{name} buys {k} boxes of {a} {item} each and gives away {b}. How many {item} are left?",
        total,
        f"{k} * {a} = {a * k}, {a * k} - {b} = {total}",
    )


def _count_on(rng: random.Random, difficulty: int) -> tuple[str, int, str]:
    """Counting on or back by 1 or 10 from a two-digit number (the answer is never guessable from
    a handful of values: two digits, one of them copied, one stepped, with carries)."""
    a, k, op = rng.randint(10, 89 + 10 * difficulty), rng.choice((1, 10)), rng.choice("+-")
    value = _OPS[op](a, k)
    return f"Compute {a} {op} {k}.", value, f"{a} {op} {k} = {value}"


def _largest(rng: random.Random, difficulty: int) -> tuple[str, int, str]:
    """The largest of 3-5 distinct numbers of two digits (three digits at difficulty 1, ...). Picking one
    of the listed numbers at random is right 1 time in 3-5, so the reported pass rate has that
    floor (the README gives it); beating it takes comparing tens, then units."""
    lo, hi = 10 ** (difficulty + 1), 10 ** (difficulty + 2) - 1
    numbers = rng.sample(range(lo, hi + 1), rng.randint(3, 5))
    listed = ", ".join(map(str, numbers))
    return (f"Which is the largest of {listed}?", max(numbers),
            f"{listed}: max \\boxed{{{max(numbers)}}}")


KINDS = {"arithmetic": _arithmetic, "algebra": _algebra, "word": _word, "count_on": _count_on,
         "largest": _largest}
_KINDS = (_arithmetic, _algebra, _word)  # without `kinds`: difficulty 1+ draws these (count_on only by name)


def boxed(answer: Any) -> str:
    return f"The answer is \\boxed{{{answer}}}."


class MathEnv(TextEnv):
    """Math problems scored by answer equivalence (math-verify)."""

    description = "arithmetic, algebra and word problems (generated, or GSM8K/MATH JSONL); math-verify reward"

    def __init__(self, *args: Any, kinds: list[str] | None = None, quote: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.quote = quote
        unknown = sorted(set(kinds or ()) - set(KINDS))
        if unknown:
            raise ValueError(f"estuary/math: unknown kinds {unknown}; choose from {sorted(KINDS)}")
        # `kinds` narrows generated problems to these families (drawn uniformly from the list, so a
        # name listed twice comes twice as often; at `difficulty`)
        self.kinds = [KINDS[k] for k in kinds] if kinds else None

    def generate(self, rng: random.Random) -> Task:
        if self.kinds:
            kind = rng.choice(self.kinds)
        else:
            kind = _KINDS[rng.randrange(len(_KINDS))] if self.difficulty > 0 else rng.choice(
                (_arithmetic, _arithmetic, _word))
        problem, answer, work = kind(rng, self.difficulty)
        if self.quote and (one := _SUM.fullmatch(work)):  # a one-step sum: quoted, its result boxed
            # a word problem's sum is written as `Compute` writes it too: the drilled form, where
            # the policy recalls the fact (its operands are copied from the story instead)
            work = f"Compute {one.group(1)} = \\boxed{{{one.group(2)}}}"
        return Task(prompt=f"{problem} {INSTRUCTION}", answer=str(answer), data={"work": work})

    def check_row(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        if not isinstance(row.get("problem"), str) or "answer" not in row:
            raise DatasetError(f"math row {index} needs 'problem' (text) and 'answer'; got {sorted(row)}")
        return row

    def from_row(self, row: dict[str, Any]) -> Task:
        answer = str(row["answer"])
        gsm = re.search(r"####\s*(.+)$", answer.strip())
        work = row.get("solution") or (answer[: gsm.start()].strip() if gsm else "")
        gold = gsm.group(1).replace(",", "").strip() if gsm else _unbox(answer)
        return Task(prompt=f"{row['problem']} {INSTRUCTION}", answer=gold, data={"work": work})

    def score_turn(self, action: str) -> TurnResult:
        assert self.task is not None
        if not _BOXED.search(action.rsplit("</think>", 1)[-1]) and not re.search(r"\d", action):
            return TurnResult(done=True, correct=0.0, verdict="no_answer")
        ok, verdict = grade_math(action, self.task.answer)  # correct | wrong | hedged | too_large
        return TurnResult(done=True, correct=float(ok), verdict=verdict)

    def reference_turn(self) -> str:
        assert self.task is not None
        work = self.task.data.get("work", "")
        return f"<think>{work}</think>\n{boxed(self.task.answer)}"


def _unbox(text: str) -> str:
    """The content of the last \\boxed{...} (braces balanced), else the text itself."""
    boxes = boxed_contents(text)
    return boxes[-1] if boxes else text.strip().strip("$")
