"""`estuary/tool_use`: multi-turn episodes where the policy calls tools, then answers.

A call is one JSON object between the tool-call tokens, one call per turn:

    <tool_call>{"name": "lookup", "arguments": {"title": "Zorvan"}}</tool_call>

Tools: `calculator` (`expression`: + - * / ** and parentheses over numbers), `python` (`code`,
run in the sandbox; its stdout is the result), `search` (`query`: documents whose text contains
every query word) and `lookup` (`title`: one document). Each instance builds its own small
document store about fictional places. The environment answers a call with a `tool` message
holding `<tool_response>...</tool_response>`; a turn without a call is the final answer,
`\\boxed{...}`. Reward: answer equivalence, minus 0.1 per malformed call; `max_turns` bounds it.
With `partial_credit=true` a wrong answer earns 0.3 x the share of the needed documents looked up
by title (the training signal of a weak policy; pass rates count only right answers).

What a policy cannot game: `python` runs behind the sandbox's audit hook (no reads outside its
fresh folder and the standard library, so no dataset, host file or other episode's data), the
calculator refuses results of more than `MAX_DIGITS` digits, a turn that writes its own
`<tool_response>` ends the episode as `forged_tool_response` (0), and the final answer is graded
like `estuary/math` (hedged or huge answers score 0).
"""

from __future__ import annotations

import ast
import json
import math
import operator
import random
import re
from typing import Any

from environments.base import DatasetError, Task, TextEnv, TurnResult
from environments.sandbox import Limits, SandboxPool, default_pool, guarded
from rewards.math import grade_math

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_FORGED = re.compile(r"</?tool_response>")
MALFORMED_PENALTY = 0.1
LOOKUP_CREDIT = 0.3  # `partial_credit`: a wrong answer after looking up every needed document
MAX_DIGITS = 1000  # calculator results; a power tower would hold the GIL for minutes
SYSTEM = (
    "You can call tools. Write one call per turn as "
    '<tool_call>{"name": TOOL, "arguments": {...}}</tool_call>. Tools: calculator(expression), '
    "python(code), search(query), lookup(title). When you know the answer, reply \\boxed{answer}."
)

_SYLLABLES = ("zor", "van", "kel", "mir", "tas", "dun", "bri", "lo", "qua", "fen", "ru", "sha")
_ATTRS = ("population", "area", "founded")


def _place_name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()


def build_store(rng: random.Random, n: int = 5) -> dict[str, dict[str, int]]:
    names: set[str] = set()
    while len(names) < n:
        names.add(_place_name(rng))
    return {name: {"population": rng.randint(100, 9999), "area": rng.randint(5, 99),
                   "founded": rng.randint(1200, 1990)} for name in sorted(names)}


_PHRASES = {"population": "a population of {}", "area": "an area of {}", "founded": "founded in {}"}


def doc_text(name: str, facts: dict[str, int]) -> str:
    population, area, founded = (_PHRASES[a].format(facts[a]) for a in ("population", "area", "founded"))
    return f"{name} is a town with {population}, {area} km2, {founded}."


_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.Pow: operator.pow, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod}


def calculate(expression: str) -> float | int:
    """Evaluate + - * / // % ** over numbers, nothing else (no names, calls or attributes)."""

    def ev(node: ast.AST) -> float | int:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or (
                    abs(left) > 1 and right * math.log10(abs(left)) > MAX_DIGITS)):
                raise ValueError("result too large")
            return _BIN[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return ev(node.operand) if isinstance(node.op, ast.UAdd) else -ev(node.operand)
        raise ValueError(f"unsupported expression element {type(node).__name__}")

    if len(expression) > 200:
        raise ValueError("expression too long")
    value = ev(ast.parse(expression, mode="eval").body)
    return int(value) if isinstance(value, float) and value.is_integer() else value


class ToolUseEnv(TextEnv):
    """Answer questions about a per-instance document store, using tools over several turns."""

    description = "multi-turn tool calls (calculator, sandboxed python, search/lookup); answer reward"

    def __init__(self, max_turns: int = 4, pool: SandboxPool | None = None, partial_credit: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(max_turns=max_turns, **kwargs)
        self.pool = pool
        self.partial_credit = partial_credit
        self.malformed = 0
        self.looked_up: set[str] = set()  # titles of this episode's documents the policy looked up

    # -- tasks ------------------------------------------------------------------------------
    def generate(self, rng: random.Random) -> Task:
        store = build_store(rng)
        names = list(store)
        a, b = rng.sample(names, 2)
        attr = rng.choice(_ATTRS)
        quote = None
        if self.difficulty == 0:
            question, answer = f"What is the {attr} of {a}?", store[a][attr]
            plan = [("lookup", {"title": a})]
            quote = _PHRASES[attr].format(answer)  # the looked-up page's words that hold the answer
        elif self.difficulty == 1:
            k = rng.randint(2, 9)
            question, answer = f"What is {k} times the {attr} of {a}?", k * store[a][attr]
            plan = [("lookup", {"title": a}), ("calculator", {"expression": f"{k} * {{{a}}}"})]
        else:
            question, answer = (f"What is the {attr} of {a} plus the {attr} of {b}?",
                                store[a][attr] + store[b][attr])
            plan = [("lookup", {"title": a}), ("lookup", {"title": b}),
                    ("calculator", {"expression": f"{{{a}}} + {{{b}}}"})]
        return Task(prompt=question, answer=str(answer), system=SYSTEM,
                    data={"store": store, "plan": plan, "attr": attr, "quote": quote})

    def check_row(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        if not isinstance(row.get("question"), str) or "answer" not in row or not isinstance(
                row.get("documents"), dict):
            raise DatasetError(f"tool_use row {index} needs 'question', 'answer' and "
                               f"'documents' (title -> text); got {sorted(row)}")
        return row

    def from_row(self, row: dict[str, Any]) -> Task:
        return Task(prompt=row["question"], answer=str(row["answer"]), system=SYSTEM,
                    data={"documents": row["documents"], "plan": []})

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self.malformed = 0
        self.looked_up = set()
        return super().reset(seed=seed, options=options)

    # -- tools ------------------------------------------------------------------------------
    def documents(self) -> dict[str, str]:
        assert self.task is not None
        if "documents" in self.task.data:
            return self.task.data["documents"]
        return {name: doc_text(name, facts) for name, facts in self.task.data["store"].items()}

    def call_tool(self, name: str, args: dict[str, Any]) -> str:
        docs = self.documents()
        if name == "calculator":
            return str(calculate(str(args["expression"])))
        if name == "lookup":
            title = str(args["title"])
            if title in docs:
                self.looked_up.add(title)
            return docs.get(title, f"no document titled {title!r}")
        if name == "search":
            words = str(args["query"]).lower().split()
            hits = [text for text in docs.values() if all(w in text.lower() for w in words)]
            return "\n".join(hits[:3]) or "no results"
        if name == "python":
            code = guarded(str(args["code"]))
            result = (self.pool or default_pool()).run(code, Limits(wall_s=5, cpu_s=5))
            return (result.stdout or result.stderr)[-2000:] or f"({result.verdict})"
        raise KeyError(name)

    # -- turns ------------------------------------------------------------------------------
    def score_turn(self, action: str) -> TurnResult:
        assert self.task is not None
        text = action.rsplit("</think>", 1)[-1]
        calls = _CALL.findall(text)
        if not calls or _FORGED.search(text):
            # Only the environment writes tool responses; a policy that writes its own is
            # inventing results, right answer or not.
            ok, verdict = (False, "forged_tool_response") if _FORGED.search(text) else grade_math(
                text, self.task.answer)
            credit = 1.0 if ok else (self._lookup_credit() if verdict == "wrong" else 0.0)
            return TurnResult(done=True, correct=credit, verdict=verdict,
                              detail={"malformed_calls": self.malformed},
                              penalty=MALFORMED_PENALTY * self.malformed)
        try:
            call = json.loads(calls[0])
            reply = self.call_tool(call["name"], dict(call.get("arguments", {})))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, SyntaxError,  # RecursionError: a call
                ZeroDivisionError, OverflowError, AttributeError, RecursionError) as e:  # nested 1000 deep
            self.malformed += 1
            reply = f"error: malformed tool call ({type(e).__name__}: {e})"
        message = {"role": "tool", "content": f"<tool_response>{reply}</tool_response>"}
        return TurnResult(done=False, reply=[message], detail={"malformed_calls": self.malformed},
                          penalty=MALFORMED_PENALTY * self.malformed)

    def _lookup_credit(self) -> float:
        """With `partial_credit`, a wrong final answer still earns LOOKUP_CREDIT times the share of
        the documents the question needs that the policy looked up by title: the first correct
        call is the skill a weak policy shows before it copies the value right. Only a lookup by
        the exact title counts (a search matches any text, so an empty query would pay)."""
        needed = {str(args["title"]) for name, args in self.task.data.get("plan", []) if name == "lookup"}
        if not self.partial_credit or not needed:
            return 0.0
        return LOOKUP_CREDIT * len(needed & self.looked_up) / len(needed)

    def reference_turn(self) -> str:
        assert self.task is not None
        plan = self.task.data["plan"]
        step = self.turn  # calls made so far
        if step < len(plan):
            name, args = plan[step]
            store = self.task.data.get("store", {})
            attr = self.task.data.get("attr")
            filled = {k: v.format(**{n: f[attr] for n, f in store.items()}) if isinstance(v, str)
                      and "{" in v else v for k, v in args.items()}
            call = json.dumps({"name": name, "arguments": filled})
            # Every turn opens with a thought, so the first token never has to tell a call turn
            # from the answer turn; a lookup's restates the question's words ("the area of
            # Keldun"), so the title is copied by matching them.
            thought = f"The {attr} of {args['title']}." if name == "lookup" and attr else f"Use {name}."
            return f"<think>{thought}</think><tool_call>{call}</tool_call>"
        # The answer quotes the page's words first: copying the number that follows "an area of"
        # in the tool's reply is the induction pattern a small policy learns first.
        quote = self.task.data.get("quote") or "The last result."
        return f"<think>{quote}</think>\\boxed{{{self.task.answer}}}"
