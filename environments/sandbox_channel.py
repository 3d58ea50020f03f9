"""A line-at-a-time pipe to a running sandboxed program (`SandboxPool.channel` opens one).

    with pool.channel(code, limits) as chan:
        reply = chan.request(b"...\n")      # raises ChannelError: closed | timeout | too_large
    chan.result                             # the ExecResult, once the block has ended

Only bytes cross: what they mean, and whether to believe them, is the caller's business. Every
wait is bounded by the run's wall-clock deadline, and replies by `max_line` bytes, so a program
that stops reading, floods its pipe or never answers costs at most its time limit.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from environments.sandbox import ExecResult

EXIT_GRACE_S = 0.5  # how long a program that closed its channel may take to exit by itself
# The least of that wait, even at the deadline: a run that a limit killed (RLIMIT_CPU as its
# wall time runs out) has exited, but its fork server reports the exit a moment later. Without
# the floor such a run was read as one that closed its channel and kept running ("exited").
EXIT_REPORT_S = 0.25
# Past the deadline a channel still takes what is ready without waiting, for this long.
LATE_READ_S = 0.1


class ChannelError(Exception):
    """The program stopped answering; `kind` is `closed`, `timeout` or `too_large`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to `timeout` s for `proc` to end; True if it is still running."""
    try:
        proc.wait(timeout=max(0.0, timeout))
        return False
    except subprocess.TimeoutExpired:
        return True


class Channel:
    """Requests and replies with one sandboxed program; one caller at a time."""

    def __init__(self, proc: subprocess.Popen, to_fd: int, from_fd: int, deadline: float,
                 max_line: int = 1 << 20) -> None:
        self.proc, self.to_fd, self.from_fd = proc, to_fd, from_fd
        self.deadline, self.max_line = deadline, max_line
        self.buffer = b""
        self.timed_out = False
        self.late_until: float | None = None  # LATE_READ_S after the first look past the deadline
        self.exited_itself = False
        """Whether the program had ended before the channel was closed (else it was killed)."""
        self.result: ExecResult | None = None
        os.set_blocking(to_fd, False)  # a program that stops reading must not block the parent

    def request(self, line: bytes) -> bytes:
        """Send `line` (newline-terminated) and return the next reply line, without its newline."""
        self.send(line)
        return self.read_line()

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._wait(self.to_fd, select.POLLOUT)
            try:
                view = view[os.write(self.to_fd, view):]
            except BlockingIOError:
                continue
            except (BrokenPipeError, OSError):
                raise ChannelError("closed", "the program closed its channel") from None

    def read_line(self) -> bytes:
        while b"\n" not in self.buffer:
            if len(self.buffer) > self.max_line:
                raise ChannelError("too_large", f"a reply longer than {self.max_line} bytes")
            self._wait(self.from_fd, select.POLLIN)
            chunk = os.read(self.from_fd, 1 << 16)
            if not chunk:
                raise ChannelError("closed", "the program closed its channel")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        if len(line) > self.max_line:
            raise ChannelError("too_large", f"a reply longer than {self.max_line} bytes")
        return line

    def _wait(self, fd: int, event: int) -> None:
        """Until `fd` is ready, or the deadline. Past the deadline a reply that is there already
        is still read (a busy parent may get to it late, though it came in time), but without
        waiting, and only for LATE_READ_S from the first late look: a program that keeps
        trickling bytes cannot stretch its time. Nothing is sent past the deadline."""
        now = time.monotonic()
        remaining = self.deadline - now
        late = remaining <= 0
        if late:
            if self.late_until is None:
                self.late_until = now + LATE_READ_S
            if event != select.POLLIN or now > self.late_until:
                self._time_out()
        poller = select.poll()  # poll, not select: a busy parent may hold descriptors past 1024
        poller.register(fd, event | select.POLLHUP | select.POLLERR)
        ready = poller.poll(max(0.0, remaining) * 1000)
        # Late, only bytes count: a pipe closed by then is a run that ran out of time, as before.
        if not ready or (late and not ready[0][1] & select.POLLIN):
            self._time_out()

    def _time_out(self) -> NoReturn:
        self.timed_out = True
        raise ChannelError("timeout", "wall-time limit exceeded")

    def close(self) -> None:
        """Close both ends; give the program a moment to exit by itself (EOF ends a worker loop)."""
        for fd in (self.to_fd, self.from_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        if not self.timed_out:
            wait_exit(self.proc, max(EXIT_REPORT_S, min(EXIT_GRACE_S, self.deadline - time.monotonic())))
        self.exited_itself = self.proc.poll() is not None
