"""Parameterised Python function tasks for `estuary/code`: a description, a solution, tests.

Each template draws its constants from the episode's seeded RNG, so the task space is endless
while every instance has a known-correct solution and tests computed from it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Draws of one instance before a template is called broken: a draw that an answer doing no work
# passes whole is drawn again (max2's four pairs all had a >= b in 15% of instances, is_prime's
# numbers were all composite in 23%: `return a`, `return False`).
MAX_DRAWS = 50


@dataclass(frozen=True)
class Template:
    name: str
    level: int  # smallest difficulty that uses it
    make: Callable[[random.Random], dict[str, Any]]

    def build(self, rng: random.Random) -> dict[str, Any]:
        """An instance: the spec with `tests`, and `trivial_share`, the largest share of its tests
        an answer that does no work passes (partial credit is paid only above it)."""
        for _ in range(MAX_DRAWS):
            spec = self.make(rng)
            namespace: dict[str, Any] = {}
            exec(spec["solution"], namespace)  # noqa: S102 - our own template code
            fn = namespace[spec["name"]]
            outputs = [fn(*a) for a in spec["inputs"]]
            spec["trivial_share"] = trivial_share(spec["inputs"], outputs)
            if spec["trivial_share"] < 1.0:
                spec["tests"] = [f"assert {spec['name']}({_args(a)}) == {o!r}"
                                 for a, o in zip(spec["inputs"], outputs, strict=True)]
                return spec
        raise RuntimeError(f"code template {self.name}: {MAX_DRAWS} draws in a row were passed whole by "
                           "an answer that does no work (a constant, or an argument handed back)")


# What an answer that does no work returns, whatever it is asked (`==` as the asserts compare:
# False is 0 and True is 1).
CONSTANTS = (0, 1, -1, None, "", [], ())


def trivial_share(inputs: list[tuple], outputs: list[Any]) -> float:
    """The largest share of the tests `assert f(*inputs[i]) == outputs[i]` that an answer doing no
    work passes: one constant from CONSTANTS, or one of its arguments handed back."""
    best = max(sum(1 for o in outputs if o == c) for c in CONSTANTS)
    for i in range(min(len(a) for a in inputs)):
        best = max(best, sum(1 for a, o in zip(inputs, outputs, strict=True) if a[i] == o))
    return best / len(outputs)


def _args(args: tuple) -> str:
    return ", ".join(repr(a) for a in args)


def _ints(rng: random.Random, n: int = 4, lo: int = -20, hi: int = 20) -> list[tuple]:
    return [(rng.randint(lo, hi),) for _ in range(n)]


def _lists(rng: random.Random, n: int = 4) -> list[tuple]:
    return [([rng.randint(-9, 9) for _ in range(rng.randint(0, 6))],) for _ in range(n)]


def _words(rng: random.Random, n: int = 4) -> list[tuple]:
    # every vowel count_char may ask about occurs in some word ('i' did not: its answer was always 0)
    vocab = ["cat", "dog", "sun", "tree", "blue", "red", "moon", "sea", "fish"]
    return [(" ".join(rng.choices(vocab, k=rng.randint(1, 4))),) for _ in range(n)]


def _add_k(rng: random.Random) -> dict[str, Any]:
    k = rng.randint(1, 9)
    return {"name": "add_k", "signature": "add_k(x)", "description": f"returns x plus {k}",
            "solution": f"def add_k(x):\n    return x + {k}", "inputs": _ints(rng)}


def _times_k(rng: random.Random) -> dict[str, Any]:
    k = rng.randint(2, 9)
    return {"name": "times_k", "signature": "times_k(x)", "description": f"returns x times {k}",
            "solution": f"def times_k(x):\n    return x * {k}", "inputs": _ints(rng)}


def _max2(rng: random.Random) -> dict[str, Any]:
    inputs = [(rng.randint(-9, 9), rng.randint(-9, 9)) for _ in range(4)]
    return {"name": "max2", "signature": "max2(a, b)", "description": "returns the larger of a and b",
            "solution": "def max2(a, b):\n    return a if a > b else b", "inputs": inputs}


def _sum_above(rng: random.Random) -> dict[str, Any]:
    k = rng.randint(-3, 3)
    return {"name": "sum_above", "signature": "sum_above(xs)",
            "description": f"returns the sum of the numbers in xs that are greater than {k}",
            "solution": f"def sum_above(xs):\n    return sum(x for x in xs if x > {k})",
            "inputs": _lists(rng)}


def _count_even(rng: random.Random) -> dict[str, Any]:
    return {"name": "count_even", "signature": "count_even(xs)",
            "description": "returns how many numbers in xs are even",
            "solution": "def count_even(xs):\n    return sum(1 for x in xs if x % 2 == 0)",
            "inputs": _lists(rng)}


def _reverse_words(rng: random.Random) -> dict[str, Any]:
    return {"name": "reverse_words", "signature": "reverse_words(s)",
            "description": "returns the words of s in reverse order, joined by single spaces",
            "solution": "def reverse_words(s):\n    return ' '.join(reversed(s.split()))",
            "inputs": _words(rng)}


def _count_char(rng: random.Random) -> dict[str, Any]:
    ch = rng.choice("aeiou")
    return {"name": "count_char", "signature": "count_char(s)",
            "description": f"returns how many times the letter '{ch}' occurs in s",
            "solution": f"def count_char(s):\n    return s.count({ch!r})", "inputs": _words(rng)}


def _fib(rng: random.Random) -> dict[str, Any]:
    return {"name": "fib", "signature": "fib(n)",
            "description": "returns the n-th Fibonacci number, with fib(0) = 0 and fib(1) = 1",
            "solution": ("def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
                         "        a, b = b, a + b\n    return a"),
            "inputs": [(rng.randint(0, 25),) for _ in range(4)]}


def _is_prime(rng: random.Random) -> dict[str, Any]:
    return {"name": "is_prime", "signature": "is_prime(n)",
            "description": "returns True if n is a prime number and False otherwise",
            "solution": ("def is_prime(n):\n    if n < 2:\n        return False\n"
                         "    return all(n % d for d in range(2, int(n ** 0.5) + 1))"),
            "inputs": [(rng.randint(0, 100),) for _ in range(5)]}


TEMPLATES = (
    Template("add_k", 0, _add_k),
    Template("times_k", 0, _times_k),
    Template("max2", 0, _max2),
    Template("sum_above", 1, _sum_above),
    Template("count_even", 1, _count_even),
    Template("reverse_words", 2, _reverse_words),
    Template("count_char", 2, _count_char),
    Template("fib", 3, _fib),
    Template("is_prime", 3, _is_prime),
)
