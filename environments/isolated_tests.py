"""Unit tests of model-written code, run where the code cannot reach them.

    outcome = run_isolated(pool, limits, program, tests, prefix=prompt, entry_point="add")
    outcome.verdict, outcome.passed, outcome.error

The solution runs alone in a sandboxed process (`solution_worker.py`, behind the audit hook of
`sandbox.guarded`). The tests run here, in the trusted process: each function the solution
defines is bound to a proxy that sends a call's arguments down a pipe and gets back plain data,
which `decode` rebuilds as builtin objects only. Nothing the solution does to its own interpreter
(an object whose `__eq__` always says True, a patched `compile`/`exec`/`print`/`json`,
`sys.exit`, exit hooks, printed reports, reads of its folder) reaches an assertion, and it never
sees a test or an expected value. HumanEval prompts run here too, so the helpers their tests use
(`poly`, `encode_cyclic`) are the dataset's, not the answer's; and a solution's function never
stands in for a builtin (`abs`) or a prompt helper in the test code. Test code is trusted (the
templates', the dataset's) and runs in this process: it should not change process-wide state.

Verdicts: passed, failed, syntax_error, timeout, sandbox_violation, and the hack-like ones
(`HACK_VERDICTS`), which fail every test even when a test swallowed the error: bad_result (a
reply that is not plain data, or too large), escaped_exception (a BaseException that is not an
Exception), exited (the process ended or closed its pipe during the tests) and
protocol_violation (a reply that is not well-formed).
"""

from __future__ import annotations

import builtins
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from environments.sandbox import Limits, SandboxPool, guarded, violation_reason
from environments.sandbox_channel import Channel, ChannelError
from environments.solution_worker import Unplain, decode, encode

HACK_VERDICTS = frozenset({"bad_result", "escaped_exception", "exited", "protocol_violation"})

_WORKER = guarded(Path(__file__).with_name("solution_worker.py").read_text())
_EXCEPTIONS = {name: cls for name, cls in vars(builtins).items()
               if isinstance(cls, type) and issubclass(cls, Exception)}
_BUILTIN_NAMES = frozenset(vars(builtins))
# Modules MBPP-style asserts use without importing them (they relied on the solution's imports).
_TEST_MODULES = ("math", "re", "collections", "itertools")
_CHANNEL_VERDICTS = {"timeout": "timeout", "too_large": "bad_result", "closed": "exited"}


@dataclass
class Outcome:
    verdict: str
    passed: int
    error: str = ""


class Stop(BaseException):
    """The solution broke a rule. A BaseException, so that no `except Exception` in a test hides
    it; the verdict is kept on the `Solution` as well, for tests with a bare `except`."""

    def __init__(self, verdict: str, reason: str) -> None:
        super().__init__(reason)
        self.verdict, self.reason = verdict, reason


class SolutionError(Exception):
    """An exception the solution raised, of a type the trusted side does not rebuild."""


class Solution:
    """The sandboxed solution process, seen from the trusted side."""

    def __init__(self, chan: Channel) -> None:
        self.chan = chan
        self.stop: Stop | None = None
        self.channel_error: ChannelError | None = None

    def load(self) -> dict[str, Any]:
        return self._reply(self.chan.read_line, "loading the solution")

    def call(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        if self.stop is not None:
            raise self.stop
        try:
            line = json.dumps({"call": name, "args": [encode(a) for a in args],
                               "kwargs": {str(k): encode(v) for k, v in kwargs.items()}})
        except (Unplain, ValueError) as e:  # the test's own argument: the test errs, not the solution
            raise TypeError(f"cannot send {e} to the solution") from None
        reply = self._reply(lambda: self.chan.request(line.encode() + b"\n"), f"calling {name}()")
        if "ok" in reply:
            value = self._decode(reply["ok"], name)
            self._write_back(args, reply.get("mutated"), name)
            return value
        if "raised" in reply:
            raise self._exception(name, str(reply["raised"]), str(reply.get("message", ""))[:300],
                                  bool(reply.get("base")))
        if "unplain" in reply:
            self.fail("bad_result", f"{name}() returned {str(reply['unplain'])[:200]}, not plain data")
        self.fail("protocol_violation", f"{name}() got a reply that is not one: {str(reply)[:200]}")

    def _reply(self, fetch, what: str) -> dict[str, Any]:
        try:
            line = fetch()
        except ChannelError as e:
            self.channel_error = e
            self.fail(_CHANNEL_VERDICTS[e.kind], f"{e} while {what}")
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError):
            self.fail("protocol_violation", f"a malformed reply while {what}: {line[:120]!r}")
        if type(reply) is not dict:
            self.fail("protocol_violation", f"a malformed reply while {what}: {line[:120]!r}")
        return reply

    def _decode(self, obj: Any, name: str) -> Any:
        try:
            return decode(obj)
        except (ValueError, RecursionError) as e:
            self.fail("protocol_violation", f"{name}() returned malformed data: {e}")

    def _write_back(self, args: tuple, mutated: Any, name: str) -> None:
        """Apply the solution's in-place changes to list/dict/set arguments, as a direct call would."""
        if not mutated:
            return
        if type(mutated) is not dict:
            self.fail("protocol_violation", f"{name}() sent malformed argument changes")
        for index, new in mutated.items():
            arg = args[int(index)] if str(index).isdigit() and int(index) < len(args) else None
            value = self._decode(new, name)
            if type(arg) is list and type(value) is list:
                arg[:] = value
            elif type(arg) in (dict, set) and type(value) is type(arg):
                arg.clear()
                arg.update(value)

    def _exception(self, name: str, kind: str, message: str, base: bool) -> BaseException:
        if base or kind not in _EXCEPTIONS:
            if base:
                self.fail("escaped_exception", f"{name}() raised {kind}, which is not an Exception")
            return SolutionError(f"{kind}: {message}")
        try:
            return _EXCEPTIONS[kind](message)
        except TypeError:  # e.g. UnicodeDecodeError wants five arguments
            return SolutionError(f"{kind}: {message}")

    def fail(self, verdict: str, reason: str) -> NoReturn:
        self.stop = Stop(verdict, reason)
        raise self.stop


class Candidate:
    """Stands for one of the solution's functions in the trusted test code."""

    def __init__(self, solution: Solution, name: str) -> None:
        self.solution, self.__name__ = solution, name
        self.__qualname__ = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.solution.call(self.__name__, args, kwargs)

    def __repr__(self) -> str:
        return f"<sandboxed function {self.__name__}>"


def run_isolated(pool: SandboxPool, limits: Limits, program: str, tests: list[str],
                 prefix: str = "", entry_point: str = "") -> Outcome:
    """Run `tests` (trusted Python, asserts or HumanEval's `check(candidate)`) against `program`."""
    with pool.channel(_WORKER, limits, files={"solution.py": program}) as chan:
        solution = Solution(chan)
        outcome = _grade(solution, tests, prefix, entry_point)
    if solution.channel_error is not None:
        outcome = _how_it_ended(outcome, chan)
    return outcome


def _grade(solution: Solution, tests: list[str], prefix: str, entry_point: str) -> Outcome:
    try:
        report = solution.load()
        if report.get("load") == "syntax":
            return Outcome("syntax_error", 0, str(report.get("error", ""))[:500])
        if report.get("load") not in ("ok", "error"):
            solution.fail("protocol_violation", f"a forged load report: {str(report)[:200]}")
        if report.get("load") == "error":
            error = f"loading the solution: {str(report.get('error'))[:500]}"
            if report.get("base"):
                solution.fail("escaped_exception", f"{error}, which is not an Exception")
            reason = violation_reason(error)
            return Outcome("sandbox_violation" if reason else "failed", 0, error)
        names = report.get("names")
        if type(names) is not list or not all(type(n) is str for n in names):
            solution.fail("protocol_violation", "a malformed list of the solution's functions")
        passed, errors = _run_tests(solution, tests, prefix, entry_point, names)
    except Stop as stop:
        return Outcome(stop.verdict, 0, stop.reason)
    error = "; ".join(errors)[:1000]
    if passed == len(tests):
        return Outcome("passed", passed)
    reason = violation_reason(error)
    if reason:  # a limit hit inside the solution (MemoryError, the guard's refusal, ...)
        return Outcome("sandbox_violation", passed, f"{reason}: {error}")
    return Outcome("failed", passed, error)


def _run_tests(solution: Solution, tests: list[str], prefix: str, entry_point: str,
               names: list[str]) -> tuple[int, list[str]]:
    namespace: dict[str, Any] = {"__name__": "__tests__"}
    for module in _TEST_MODULES:
        namespace[module] = __import__(module)
    if prefix:  # the dataset's prompt (trusted): the helpers its tests call
        exec(compile(prefix, "prompt", "exec"), namespace)  # noqa: S102
    # The solution's functions, but never in place of a builtin or of the prompt's own helpers:
    # a solution that defines `abs` must not answer the test's `abs(...)`.
    for name in names:
        if name not in namespace and name not in _BUILTIN_NAMES and not name.startswith("__"):
            namespace[name] = Candidate(solution, name)
    if entry_point:
        namespace[entry_point] = Candidate(solution, entry_point)
    passed, errors = 0, []
    for i, test in enumerate(tests):
        try:
            exec(compile(test, f"test_{i}", "exec"), namespace)  # noqa: S102 - trusted test code
            passed += 1
        except Exception as e:  # noqa: BLE001 - a failed test
            errors.append(f"test {i}: {e!r}"[:300])
        if solution.stop is not None:  # broken rules count even if the test caught them
            raise solution.stop
    return passed, errors


def _how_it_ended(outcome: Outcome, chan: Channel) -> Outcome:
    """Name a broken pipe by how the process ended: a limit, or an exit of its own."""
    result = chan.result
    if result is not None and chan.exited_itself and result.verdict in ("timeout", "sandbox_violation"):
        return Outcome(result.verdict, 0, f"{result.reason} ({outcome.error})")
    if outcome.verdict == "exited" and result is not None:
        how = (f"exited with status {result.exit_code}" if chan.exited_itself
               else "closed its channel and kept running")
        return Outcome("exited", 0, f"the solution process {how} ({outcome.error})")
    return outcome
