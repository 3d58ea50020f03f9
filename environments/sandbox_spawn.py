"""The parent's side of a sandbox slot's fork server (`sandbox_forkserver.py`).

    server = ForkServer(python, base, slot_uids)     # one per pool slot, started on first use
    child = server.spawn(request, [stdout_fd, stderr_fd, *channel_fds])
    child.wait(timeout=5)                            # subprocess.Popen's wait/poll/returncode
    os.killpg(child.pid, signal.SIGKILL)             # safe until release(): the pid is not reaped
    child.release()                                  # the server reaps it; the slot is free again

One slot runs one execution at a time (`SandboxPool` holds the slot), so a server answers one
request at a time. A server that died (killed, or a parent fork that kept its socket and exited)
is started again on the next spawn; the run that was in flight on it ends as killed.
"""

from __future__ import annotations

import array
import json
import select
import signal
import socket
import subprocess
import threading
from pathlib import Path

SERVER = Path(__file__).with_name("sandbox_forkserver.py")
SCRUBBED_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
SETUP_TIMEOUT_S = 30.0


class SandboxSetupError(RuntimeError):
    """The fork server could not set up an execution (or start at all)."""


class ForkedChild:
    """A Popen-like handle on one execution forked by a `ForkServer`."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server, self.pid = server, pid
        self.returncode: int | None = None
        self.orphaned = False
        """The server died (or was killed) first: the pid is no longer held, never signal it."""
        self._released = False

    def poll(self) -> int | None:
        if self.returncode is None:
            self._read_exit(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and not self._read_exit(timeout):
            raise subprocess.TimeoutExpired(f"sandboxed pid {self.pid}", timeout or 0.0)
        return self.returncode  # type: ignore[return-value]

    def release(self) -> None:
        """Let the server kill what is left of the run and reap it; the pid is not ours after this."""
        if not self._released:
            self._released = True
            self.server.reap()

    def abandon(self) -> None:
        """A server that does not report within bounds (stopped, say) is killed; the run with it."""
        self.server.kill()
        self.returncode, self.orphaned = -signal.SIGKILL, True

    def _read_exit(self, timeout: float | None) -> bool:
        message = self.server.receive(timeout)
        if message is None:
            return False
        if "exit" in message:
            self.returncode = int(message["exit"])
        else:
            self.returncode, self.orphaned = -signal.SIGKILL, True
        return True


class ForkServer:
    """One sandbox slot's fork server process, started on first use and again if it died."""

    def __init__(self, python: str, base: str, slot_uids: bool) -> None:
        self.python, self.base = python, base  # base: the folder the pool's work folders are in
        self.mode = "slot-uids" if slot_uids else "no-uids"  # runs as slot uids: the root set-up
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def spawn(self, request: dict, fds: list[int]) -> ForkedChild:
        """Fork one execution of `request` (workdir, uid, limits, nfds) with `fds` as its stdout,
        stderr and channel ends. Raises SandboxSetupError if its setup failed."""
        with self._lock:
            for attempt in (0, 1):  # a dead server is restarted once
                sock = self._ensure_started()
                try:
                    sock.sendmsg([json.dumps(request).encode()],
                                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                    sock.settimeout(SETUP_TIMEOUT_S)  # a fork and a few syscalls: never this long
                    reply = sock.recv(1 << 16)
                except TimeoutError:
                    self.kill()
                    raise SandboxSetupError(f"the sandbox fork server did not answer in {SETUP_TIMEOUT_S} s") from None
                except OSError:
                    reply = b""
                finally:
                    if self._sock is not None:
                        self._sock.settimeout(None)
                if reply:
                    break
                self._stop()
                if attempt:
                    raise SandboxSetupError("the sandbox fork server died twice while starting a run")
        message = json.loads(reply)
        if "error" in message:
            raise SandboxSetupError(f"sandbox setup failed in the child:\n{message['error']}")
        return ForkedChild(self, int(message["pid"]))

    def receive(self, timeout: float | None) -> dict | None:
        """The server's next message, or None if none came within `timeout` (None: wait).
        A server that died reads as the run killed."""
        sock = self._sock
        if sock is None:
            return {"killed": True}
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        if not poller.poll(None if timeout is None else max(0.0, timeout) * 1000):
            return None
        try:
            data = sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            self._stop()
            return {"killed": True}
        return json.loads(data)

    def reap(self) -> None:
        """Tell the server the run is over: it kills what is left of it and reaps it."""
        if self._sock is None:
            return
        try:
            self._sock.send(b'{"reap": true}')
        except OSError:
            self._stop()

    def close(self) -> None:
        with self._lock:
            self._stop()

    def kill(self) -> None:
        """SIGKILL the server (its run dies with it or is orphaned), then forget it."""
        if self._proc is not None:
            self._proc.kill()
        self._stop()

    def _ensure_started(self) -> socket.socket:
        if self._sock is None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                self._proc = subprocess.Popen(
                    [self.python, "-I", "-S", "-B", str(SERVER), str(theirs.fileno()), self.base, self.mode],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    env=SCRUBBED_ENV, close_fds=True,
                    start_new_session=True,  # a terminal's Ctrl-C is for the parent, not the server
                )
            finally:
                theirs.close()
            self._sock = ours
        return self._sock

    def _stop(self) -> None:
        """Close our end (EOF ends the server and kills its running child), then reap it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
