"""`estuary/long_context`: RULER-style synthetic tasks over a haystack of 1k to 1M tokens.

Tasks (`task=` one of these, or `mixed`): `niah_single` (one needle), `niah_multi` (several
values for one key: F1), `multikey` (one key among many look-alike keys), `variable_tracking`
(which variables end up holding a value through a chain of assignments: F1), `aggregation`
(sum the counts that several documents report). Needle values have `value_digits` digits (7, as
in RULER; fewer for a small policy that is still learning to copy). The haystack is built only when an episode
starts, from a seeded choice of filler sentences, so a 1M-token prompt takes well under a second.
Lengths are in tokens at `chars_per_token` (4 for typical BPE tokenizers).

A dataset row has `context`, `question` and `answer` (a string or a list of strings).

An answer listing more than `MAX_LIST_FACTOR` times as many distinct values as the gold answer
scores 0 (`too_many_values`): F1 would otherwise pay a policy for listing every candidate key,
value or variable name without reading the context.
"""

from __future__ import annotations

import random
import re
from typing import Any

from environments.base import DatasetError, Task, TextEnv, TurnResult

TASKS = ("niah_single", "niah_multi", "multikey", "variable_tracking", "aggregation")

_FILLER = (
    "The grass is green and the sky is blue.",
    "A quiet river runs past the old mill.",
    "Markets open early on the first day of the week.",
    "The library keeps its oldest maps in a locked room.",
    "Snow fell over the hills late in the evening.",
    "Travellers rested at the inn before crossing the pass.",
    "The committee met again to review the annual plan.",
    "Bright lanterns lined the harbour wall at night.",
    "Farmers brought their harvest to the village square.",
    "An orchestra rehearsed in the hall across the street.",
    "The bridge was repaired after the spring floods.",
    "Children learned to read under the tall oak tree.",
)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
MAX_LIST_FACTOR = 2


def _key(rng: random.Random) -> str:
    return "-".join(rng.choice(("amber", "cobalt", "falcon", "granite", "harbor", "juniper",
                                "lotus", "meadow", "nimbus", "onyx", "prairie", "quartz"))
                    for _ in range(2)) + f"-{rng.randint(10, 99)}"


def haystack(rng: random.Random, n_chars: int, inserts: list[str]) -> str:
    """Filler text of about `n_chars` with `inserts` placed at random sentence boundaries."""
    mean = sum(map(len, _FILLER)) / len(_FILLER) + 1
    n = max(len(inserts) + 1, int(n_chars / mean))
    sentences = rng.choices(_FILLER, k=n)
    for text, pos in zip(inserts, sorted(rng.sample(range(n), len(inserts))), strict=True):
        sentences[pos] = text
    return " ".join(sentences)


def f1(predicted: list[str], gold: list[str]) -> float:
    """Set F1 between predicted and gold values."""
    p, g = set(predicted), set(gold)
    hit = len(p & g)
    if not hit:
        return 0.0
    precision, recall = hit / len(p), hit / len(g)
    return 2 * precision * recall / (precision + recall)


def parse_answer(response: str) -> list[str]:
    """Values in the last \\boxed{...} of the response, split on commas."""
    found = _BOXED.findall(response.rsplit("</think>", 1)[-1])
    if not found:
        return []
    return [v.strip().strip(".") for v in found[-1].split(",") if v.strip()]


class LongContextEnv(TextEnv):
    """Retrieval, tracking and aggregation over long synthetic contexts."""

    description = "RULER-style needles, multi-key, variable tracking, aggregation; 1k-1M tokens"

    def __init__(self, length_tokens: int = 1024, task: str = "mixed", chars_per_token: float = 4.0,
                 value_digits: int = 7, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 3 <= value_digits <= 12:
            raise ValueError(f"value_digits={value_digits} must be between 3 and 12 (RULER uses 7)")
        self.value_digits = value_digits
        if task != "mixed" and task not in TASKS:
            raise ValueError(f"unknown long-context task {task!r}; choose mixed or one of {TASKS}")
        self.length_tokens = length_tokens
        self.task_name = task
        self.chars_per_token = chars_per_token

    def generate(self, rng: random.Random) -> Task:
        name = rng.choice(TASKS) if self.task_name == "mixed" else self.task_name
        n_chars = int(self.length_tokens * self.chars_per_token)
        inserts, question, answer, *shown = getattr(self, f"_{name}")(rng)
        evidence = shown[0] if shown else inserts  # the lines that hold the answer (all, unless decoys)
        context = haystack(rng, n_chars - len(question) - 64, inserts)
        return Task(prompt=f"{context}\n\n{question} Reply with \\boxed{{...}}.",
                    answer=answer, data={"task": name, "metric": "f1" if len(answer) > 1 else "em",
                                         "evidence": evidence})

    def _span(self) -> tuple[int, int]:
        return 10 ** (self.value_digits - 1), 10 ** self.value_digits

    def _value(self, rng: random.Random) -> str:
        """A needle's value: `value_digits` digits, so a guess is right once in 9 x 10^(digits-1)."""
        low, high = self._span()
        return str(rng.randrange(low, high))

    def _niah_single(self, rng):
        key, value = _key(rng), self._value(rng)
        return ([f"The special magic number for {key} is {value}."],
                f"What is the special magic number for {key}?", [value])

    def _niah_multi(self, rng):
        key = _key(rng)
        values = [str(v) for v in rng.sample(range(*self._span()), 3)]
        inserts = [f"One of the special magic numbers for {key} is {v}." for v in values]
        return inserts, f"What are all the special magic numbers for {key}?", values

    def _multikey(self, rng):
        keys = list({_key(rng) for _ in range(6)})
        values = {k: self._value(rng) for k in keys}
        target = rng.choice(keys)
        inserts = [f"The special magic number for {k} is {values[k]}." for k in keys]
        evidence = [f"The special magic number for {target} is {values[target]}."]
        return inserts, f"What is the special magic number for {target}?", [values[target]], evidence

    def _variable_tracking(self, rng):
        value = str(rng.randint(10000, 99999))
        names = rng.sample([f"V{c}{d}" for c in "ABCDEFGH" for d in range(10)], 4)
        inserts = [f"VAR {names[0]} = {value}."]
        inserts += [f"VAR {names[i]} = {names[i - 1]}." for i in range(1, len(names))]
        return (inserts, f"Which variables are assigned the value {value}, directly or through "
                "other variables? List them all.", names)

    def _aggregation(self, rng):
        item = rng.choice(("lanterns", "barrels", "ledgers", "saddles"))
        counts = [rng.randint(2, 40) for _ in range(rng.randint(2, 4))]
        inserts = [f"Report {i + 1}: the warehouse counted {c} {item}." for i, c in enumerate(counts)]
        return inserts, f"What is the total number of {item} counted across all reports?", [str(sum(counts))]

    def check_row(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        if not all(isinstance(row.get(k), str) for k in ("context", "question")) or "answer" not in row:
            raise DatasetError(f"long_context row {index} needs 'context', 'question', 'answer'")
        return row

    def from_row(self, row: dict[str, Any]) -> Task:
        answer = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        answer = [str(a) for a in answer]
        return Task(prompt=f"{row['context']}\n\n{row['question']} Reply with \\boxed{{...}}.",
                    answer=answer, data={"metric": "f1" if len(answer) > 1 else "em"})

    def score_turn(self, action: str) -> TurnResult:
        assert self.task is not None
        predicted = parse_answer(action)
        if not predicted:
            return TurnResult(done=True, correct=0.0, verdict="no_answer")
        gold = self.task.answer
        if len(set(predicted)) > MAX_LIST_FACTOR * len(gold):
            return TurnResult(done=True, correct=0.0, verdict="too_many_values")
        if self.task.data["metric"] == "em":
            score = float(predicted == gold)
        else:
            score = f1(predicted, gold)
        verdict = "correct" if score == 1.0 else ("partial" if score > 0 else "wrong")
        return TurnResult(done=True, correct=score, verdict=verdict)

    def reference_turn(self) -> str:
        """The reference thought quotes the context's lines that hold the answer, then answers.

        Quoting turns retrieval into the pattern a small attention stack learns first: the
        question's key is copied, the context line that follows the same key is copied on (an
        induction head), and the boxed value is copied from the line just written. Dataset rows
        carry no evidence; their thought only says where to look."""
        assert self.task is not None
        quote = " ".join(self.task.data.get("evidence", [])) or "Find it in the context."
        return f"<think>{quote}</think>\n\\boxed{{{', '.join(self.task.answer)}}}"
