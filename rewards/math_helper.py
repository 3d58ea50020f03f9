"""math-verify in helper processes, so that no answer can stall the process that grades it.

    verify_in_helper(gold_latex, answer_text, timeout_s=5.0)   # True, False, or None: too slow

An answer like `\\boxed{9^{9^{9}}}` makes sympy build a number of hundreds of millions of digits
inside one C call that holds the GIL: no thread time-out or signal can stop it, and every thread
of a rollout worker would stall. Here parse + verify run in a small pool of long-lived helper
processes (`python -m rewards.math_helper`, one JSON line in, one out), each with an
address-space limit; one that runs past `timeout_s` is killed and replaced on next use. A helper
imports math-verify once (about a second) before it says it is ready, so start-up never counts
against an answer's time.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import select
import subprocess
import sys
import threading
from pathlib import Path

MAX_HELPERS = max(1, min(4, os.cpu_count() or 1))
MEMORY_BYTES = 3 << 30  # sympy on a pathological answer fails with MemoryError, not the machine
START_TIMEOUT_S = 120.0
_ROOT = str(Path(__file__).resolve().parents[1])


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

    def ask(self, gold: str, answer: str, timeout_s: float) -> bool | None:
        try:
            self.proc.stdin.write((json.dumps([gold, answer]) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            self.kill()
            return None
        reply = self._read(timeout_s)
        if reply is None:
            self.kill()
        return None if reply is None else reply == "true"

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


def verify_in_helper(gold: str, answer: str, timeout_s: float) -> bool | None:
    """math-verify's verdict on `answer` against `gold`; None if it took longer than `timeout_s`."""
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
            pred_parsed = parse(answer, parsing_timeout=None)
            ok = bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None))
        except Exception:  # noqa: BLE001 - a parse failure (or MemoryError) is a wrong answer
            ok = False
        print("true" if ok else "false", flush=True)


if __name__ == "__main__":
    _serve()
