"""math-verify in helper processes, so that no answer can stall the process that grades it.

    verify_in_helper(gold_latex, answer_text, timeout_s=5.0)   # "correct", "wrong", ..., or None: too slow

An answer like `\\boxed{9^{9^{9}}}` makes sympy build a number of hundreds of millions of digits
inside one C call that holds the GIL: no thread time-out or signal can stop it, and every thread
of a rollout worker would stall. Here parse + verify run in a small pool of long-lived helper
processes (`python -m rewards.math_helper`, one JSON line in, one out), each with an
address-space limit; one that runs past `timeout_s` is killed and replaced on next use. A helper
imports math-verify once (about a second) before it says it is ready, so start-up never counts
against an answer's time.

Where the gold is a plain number, the helper also judges the value math-verify extracted (what it
would grade, whichever of a box, "the final answer is ..." or a trailing `= ...` that is): it
must be a plain number too (units, `$`, `%` and thousands separators allowed, and a fraction of
integers where the gold is not an integer). Otherwise math-verify would compute the answer for a
policy that only restated the problem (`5 + 9`, `\\max(57, 91)`): `unevaluated`, or `hedged` for
a list of numbers.
"""

from __future__ import annotations

import json
import os
import queue
import re
import resource
import select
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

MAX_HELPERS = max(1, min(4, os.cpu_count() or 1))
MEMORY_BYTES = 3 << 30  # sympy on a pathological answer fails with MemoryError, not the machine
START_TIMEOUT_S = 120.0
_ROOT = str(Path(__file__).resolve().parents[1])
# What may wrap a plain number: units in \text{}, currency and percent signs, thin spaces and
# braced thousands separators (`1{,}200`), which say nothing about the value.
_DECORATION = re.compile(r"\\(?:text|mathrm|textbf|mbox|operatorname)\{[^{}]*\}|\\?[$%]|\{,\}|\\[,;:! ]|\s+"
                         r"|\^\s*\{?\\circ\}?")
# A number inside \text{} or bold is still the number (`\text{72}`, `\mathbf{72}`).
_WRAPPED_NUMBER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\{\s*(\\?\$?[\d.,]+)\s*\}")
# Digits apart with only space between: math-verify adds them (`5 9` is 14), a restated sum.
_SPACED_DIGITS = re.compile(r"\d(?:\s|~|\\[,;:! ])+\d")
_PLAIN = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_FRACTION = re.compile(r"[-+]?(?:\\[dt]?frac\{\d+\}\{\d+\}|\d+/\d+)")
_OPERATOR = re.compile(r"[-+*/^×÷−]|\\[A-Za-z]+")


def value_verdict(extracted: str, gold_is_integer: bool) -> str | None:
    """None if `extracted` (math-verify's extracted answer) states a plain number, else
    `unevaluated` (an expression) or `hedged` (several numbers)."""
    value = _WRAPPED_NUMBER.sub(r"\1", extracted.rsplit("=", 1)[-1])
    # A decoration between digits parts two numbers as a space does: `9^\circ 8` lost its degree
    # sign to math-verify, which then added 9 and 8 (a restated sum paid). `{,}` joins a number.
    if _SPACED_DIGITS.search(_DECORATION.sub(lambda m: "" if m.group(0) == "{,}" else " ", value)):
        return "hedged"
    value = _DECORATION.sub("", value).strip("()")
    if _PLAIN.fullmatch(value) or (not gold_is_integer and _FRACTION.fullmatch(value)):
        return None
    if _OPERATOR.search(value.lstrip("-+")):
        return "unevaluated"
    return "hedged" if len(re.findall(r"\d+", value)) > 1 else "unevaluated"


def graded_as_written(parsed: object, extracted: str) -> bool:
    """Whether math-verify's value of a plain-number answer (`value_verdict` passed it) is the number
    written: a decoration it drops must not make two numbers one it computes. Percentages (which it
    scales) and values that are not numbers (an equation's, say) are left to `verify`."""
    if "%" in extracted or not getattr(parsed, "is_Number", False):
        return True
    value = _DECORATION.sub("", _WRAPPED_NUMBER.sub(r"\1", extracted.rsplit("=", 1)[-1])).strip("()")
    if _PLAIN.fullmatch(value):
        written = Fraction(value.replace(",", ""))
    elif _FRACTION.fullmatch(value):
        top, bottom = (int(n) for n in re.findall(r"\d+", value))
        written = Fraction(-top if value.startswith("-") else top, bottom or 1)
    else:
        return True
    try:
        return abs(float(parsed) - float(written)) <= 1e-9 * max(1.0, abs(float(written)))
    except (TypeError, ValueError, OverflowError):
        return False


class _Helper:
    """One helper process; used by one thread at a time."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (_ROOT, os.environ.get("PYTHONPATH")))))
        self.proc = subprocess.Popen([sys.executable, "-m", "rewards.math_helper"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                     start_new_session=True)
        try:
            resource.prlimit(self.proc.pid, resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
        except (OSError, ValueError):
            pass  # a limit is a safeguard, not a requirement
        if self._read(START_TIMEOUT_S) != "ready":
            self.kill()
            raise RuntimeError("the math-verify helper process did not start")

    def ask(self, gold: str, answer: str, timeout_s: float) -> str | None:
        try:
            self.proc.stdin.write((json.dumps([gold, answer]) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            self.kill()
            return None
        reply = self._read(timeout_s)
        if reply is None:
            self.kill()
        return reply

    def _read(self, timeout_s: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else b""
        return line.decode().strip() if line else None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            stream.close()


class _Pool:
    def __init__(self, size: int) -> None:
        self.size, self.count = size, 0
        self.idle: queue.SimpleQueue[_Helper] = queue.SimpleQueue()
        self.lock = threading.Lock()

    def checkout(self) -> _Helper:
        try:
            return self.idle.get_nowait()
        except queue.Empty:
            pass
        with self.lock:
            grow = self.count < self.size
            self.count += grow
        if not grow:
            return self.idle.get()
        try:
            return _Helper()
        except BaseException:
            with self.lock:
                self.count -= 1
            raise

    def checkin(self, helper: _Helper) -> None:
        if helper.alive:
            self.idle.put(helper)
        else:
            with self.lock:
                self.count -= 1


_POOL = _Pool(MAX_HELPERS)


def verify_in_helper(gold: str, answer: str, timeout_s: float) -> str | None:
    """The verdict on `answer` against `gold` (correct | wrong | unevaluated | hedged); None if it
    took longer than `timeout_s`."""
    helper = _POOL.checkout()
    try:
        return helper.ask(gold, answer, timeout_s)
    finally:
        _POOL.checkin(helper)


def _serve() -> None:
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    print("ready", flush=True)
    for line in sys.stdin:
        gold, answer = json.loads(line)
        try:
            gold_parsed = parse(gold, parsing_timeout=None)
            # first_match: the extracted string is then the very span graded (with `any_match` a
            # broken box is returned as the string while a later `$5+9$` is what gets graded)
            pred_parsed = parse(answer, parsing_timeout=None, extraction_mode="first_match")
            verdict = None
            if gold_parsed and pred_parsed and getattr(gold_parsed[0], "is_Number", False):
                verdict = value_verdict(str(pred_parsed[-1]), bool(gold_parsed[0].is_Integer))
                if verdict is None and not graded_as_written(pred_parsed[0], str(pred_parsed[-1])):
                    verdict = "unevaluated"
            if verdict is None:
                ok = bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None))
                verdict = "correct" if ok else "wrong"
        except Exception:  # noqa: BLE001 - a parse failure (or MemoryError) is a wrong answer
            verdict = "wrong"
        print(verdict, flush=True)


if __name__ == "__main__":
    _serve()
