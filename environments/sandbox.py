"""Run model-written Python in a sandbox: the code is hostile, the parent must never suffer.

    pool = SandboxPool(max_parallel=2)
    result = pool.run("print(1 + 1)", Limits(wall_s=5))
    result.verdict, result.stdout            # ("ok", "2\n")

    with pool.channel(worker_code, Limits(wall_s=5)) as chan:   # a program that talks back:
        reply = chan.request(b'{"call": ...}\n')                #   one line out, one line back
    chan.result.verdict                                           # how it ended, as for run()

`guarded(code)` prepends an audit hook (`environments/sandbox_guard.py`) for programs that need
only computation: no reads outside their folder and the standard library, no subprocesses.

Each execution gets a fresh temporary folder (removed afterwards), closed stdin, a scrubbed
environment, the interpreter of `python -I -S` (no site-packages, no user paths), its own
process group and resource limits: CPU time, address space, processes/threads, file size (which
also bounds captured output), open files, no core dumps. Wall time is enforced by the parent.
Each slot has a fork server (`sandbox_forkserver.py`, started on first use): an interpreter
that forks every execution of the slot instead of starting a new one (4 ms for an empty
program where a fresh `python` from a parent with torch loaded took 30).

Isolation that needs privileges is applied when the process has them (root, as in CI and
containers), and the weaker fallback is used otherwise:

| threat | root | unprivileged fallback |
|---|---|---|
| network | new network namespace (no interfaces up) | new user+net namespace if the kernel allows, else `socket` blocked in-process |
| files outside its folder | runs as a per-slot unprivileged uid; private tmpfs over /tmp, /var/tmp, /dev/shm, emptied after each run | the folder is its cwd; other writable paths stay writable |
| processes that outlive the run | every process of the slot's uid is killed afterwards | the process group is killed afterwards |
| signalling the fork server or the trainer | different uid: EPERM | not prevented (same uid); a stopped server is killed after 5 s |
| reading the parent's environment | env scrubbed; /proc/<pid>/environ unreadable to another uid | env scrubbed; the trainer's /proc/<pid>/environ stays readable |
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import signal
import stat
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from environments.sandbox_channel import Channel, wait_exit
from environments.sandbox_folders import (
    LOCK,
    held_pool_folder,
    remove_tree,
    sweep_dead_pool_folders,
)
from environments.sandbox_spawn import ForkedChild, ForkServer

IS_ROOT = os.geteuid() == 0
SANDBOX_UID_BASE = 62000  # one uid per pool slot, so a slot's leftovers can be found and killed
SANDBOX_UID_RANGE = 4096
# Pools in other processes (rollout workers on one node, parallel test runs) must never share a
# uid: each kills every process of its uids after a run. A uid is held by an flock on its file.
_UID_LOCKS = Path(tempfile.gettempdir()) / "estuary-sandbox-uids"
REPORT_TIMEOUT_S = 5.0  # how long a fork server may take to report a killed run's end


_BLOCK_SOCKETS = (
    "import socket as _s\n"
    "def _no_net(*a, **k):\n"
    "    raise PermissionError('network access is disabled in the Estuary sandbox')\n"
    "_s.socket = _s.create_connection = _s.socketpair = _no_net\n"
    "del _s, _no_net\n"
)


@dataclass(frozen=True)
class Limits:
    """Resource limits of one execution."""

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 512
    max_processes: int = 16
    file_size_mb: int = 8
    open_files: int = 64
    output_bytes: int = 65536


@dataclass
class ExecResult:
    """What one execution did: a verdict, its output (truncated) and how it ended."""

    verdict: str  # ok | error | syntax_error | timeout | sandbox_violation
    exit_code: int | None
    stdout: str
    stderr: str
    wall_s: float
    reason: str = ""


_VIOLATIONS = (
    ("MemoryError", "memory limit exceeded"),
    ("BlockingIOError", "process limit exceeded"),
    ("Resource temporarily unavailable", "process limit exceeded"),
    ("can't start new thread", "thread limit exceeded"),
    ("Too many open files", "open-file limit exceeded"),
    ("network access is disabled", "network access attempted"),
    ("Network is unreachable", "network access attempted"),
    ("Cannot assign requested address", "network access attempted"),
    ("Connection refused", "network access attempted"),
    ("Operation not permitted", "forbidden operation"),
    ("Permission denied", "forbidden file access"),
    ("Read-only file system", "forbidden file access"),
    ("File too large", "file size / output limit exceeded"),
    ("not allowed in the Estuary sandbox", "forbidden operation"),
)

_GUARD = (Path(__file__).with_name("sandbox_guard.py")).read_text()


def guarded(code: str) -> str:
    """`code` behind the audit-hook prelude of `sandbox_guard.py` (for computation-only code)."""
    return _GUARD + "\n" + code


def violation_reason(text: str) -> str | None:
    """Why `text` (an error message or traceback) shows the code hitting a sandbox limit."""
    for needle, reason in _VIOLATIONS:
        if needle in text:
            return reason
    return None


def _kill_uid(uid: int) -> None:
    """Kill every process owned by `uid` (a slot uid: only sandboxed code runs as it)."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        victims = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.stat(f"/proc/{entry}").st_uid != uid:
                        continue
                    with open(f"/proc/{entry}/stat") as f:
                        state = f.read().rsplit(")", 1)[1].split()[0]
                except (OSError, IndexError):
                    continue
                if state != "Z":  # a zombie is dead already; its new parent reaps it
                    victims.append(int(entry))
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _classify(code: int | None, stderr: str, timed_out: bool) -> tuple[str, str]:
    if timed_out:
        return "timeout", "wall-time limit exceeded"
    if code == 0:
        return "ok", ""
    if code is not None and code < 0:
        sig = signal.Signals(-code)
        if sig == signal.SIGXCPU:
            return "timeout", "CPU-time limit exceeded"
        if sig == signal.SIGXFSZ:
            return "sandbox_violation", "file size / output limit exceeded"
        return "sandbox_violation", f"killed by {sig.name}"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if "SyntaxError" in last or "IndentationError" in last:
        return "syntax_error", last
    reason = violation_reason(stderr)
    return ("sandbox_violation", reason) if reason else ("error", last)


def _claim_uids(n: int) -> tuple[list[int], list[int]]:
    """`n` sandbox uids that no other live pool holds, and the locked descriptors that hold them
    (released when this process ends, however it ends)."""
    _UID_LOCKS.mkdir(mode=0o700, exist_ok=True)
    uids, fds = [], []
    for uid in range(SANDBOX_UID_BASE, SANDBOX_UID_BASE + SANDBOX_UID_RANGE):
        fd = os.open(_UID_LOCKS / str(uid), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        uids.append(uid)
        fds.append(fd)
        if len(uids) == n:
            return uids, fds
    raise RuntimeError(f"every sandbox uid from {SANDBOX_UID_BASE} is held by another process")


def _world_executable(path: str) -> bool:
    """True if any uid may run `path` (the file and every folder above it are o+x)."""
    real = Path(os.path.realpath(path))
    try:
        if not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    except OSError:
        return False


def _pick_python(preferred: str | None) -> str | None:
    """An interpreter the sandbox uid can run (the code needs only the standard library)."""
    for candidate in (preferred, sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if candidate and os.path.exists(candidate) and _world_executable(candidate):
            return candidate
    return None


class SandboxPool:
    """Runs executions in parallel, at most `max_parallel` at a time; thread-safe."""

    def __init__(self, max_parallel: int = 2, python: str | None = None) -> None:
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(max_parallel):
            self._slots.put(slot)
        shared = _pick_python(python) if IS_ROOT else None
        # As root, code runs under a slot uid, which needs an interpreter outside root's home.
        self.isolated_uid = shared is not None
        self.python = shared or python or sys.executable
        self.uids, self._uid_locks = _claim_uids(max_parallel) if self.isolated_uid else ([], [])
        # The runs' folders, in one folder that the fork servers' private /tmp shows; held by a
        # lock, so a pool killed with SIGKILL leaves a folder the next pool can tell is dead.
        sweep_dead_pool_folders()
        self.base, self._folder_lock = held_pool_folder()
        os.chmod(self.base, 0o711)  # slot uids reach their own folder, list nothing
        # One fork server per slot: a run forks a warm interpreter instead of starting one.
        self._servers = [ForkServer(self.python, self.base, self.isolated_uid) for _ in range(max_parallel)]
        self._finalizer = weakref.finalize(self, _close, self._servers, self.base, os.getpid(), self._folder_lock)

    def close(self) -> None:
        """Stop the slots' fork servers and remove the pool's folder."""
        self._finalizer()

    def run(self, code: str, limits: Limits = Limits(), files: dict[str, str] | None = None) -> ExecResult:
        """Execute `code` (a Python program) with `limits`; never raises for what the code does."""
        with self._prepared(code, files or {}) as (slot, workdir, uid, out, err):
            start = time.monotonic()
            proc = self._spawn(slot, workdir, out, err, limits, uid)
            timed_out = True
            try:
                timed_out = wait_exit(proc, limits.wall_s)
            finally:  # also on an exception here: the slot's server must hear the run is over
                result = _finish(proc, uid, out, err, limits, start, timed_out)
            return result

    @contextlib.contextmanager
    def channel(self, code: str, limits: Limits = Limits(),
                files: dict[str, str] | None = None) -> Iterator[Channel]:
        """Run `code` as `main.py RFD WFD` with a line pipe each way (see `Channel`).

        The program is stopped when the block ends, or at `limits.wall_s`; then `chan.result`
        says how it ended, as `run` would.
        """
        with self._prepared(code, files or {}) as (slot, workdir, uid, out, err):
            down_r, down_w = os.pipe()
            up_r, up_w = os.pipe()
            try:
                start = time.monotonic()
                proc = self._spawn(slot, workdir, out, err, limits, uid, fds=(down_r, up_w))
            except BaseException:
                os.close(down_w)
                os.close(up_r)
                raise
            finally:
                os.close(down_r)
                os.close(up_w)
            chan = Channel(proc, down_w, up_r, start + limits.wall_s)
            try:
                yield chan
            finally:
                chan.close()
                chan.result = _finish(proc, uid, out, err, limits, start, chan.timed_out)

    @contextlib.contextmanager
    def _prepared(self, code: str, files: dict[str, str]):
        """A slot, and a fresh folder with `code` as main.py plus `files`, owned by the slot's uid."""
        slot = self._slots.get()
        uid = self.uids[slot] if self.isolated_uid else None
        workdir = None
        try:
            workdir = Path(tempfile.mkdtemp(prefix="estuary-sbx-", dir=self.base))
            prelude = "" if uid is not None else _BLOCK_SOCKETS
            (workdir / "main.py").write_text(prelude + code)
            for name, text in files.items():
                (workdir / Path(name).name).write_text(text)
            out_path, err_path = workdir / ".stdout", workdir / ".stderr"
            if uid is not None:
                os.chown(workdir, uid, uid)
                for path in workdir.iterdir():
                    os.chown(path, uid, uid)
            # Read back through the parent's own descriptors, never by path: the code owns the
            # folder and could swap the files for forged output.
            with open(out_path, "w+b") as out, open(err_path, "w+b") as err:
                yield slot, workdir, uid, out, err
        finally:  # the slot goes back whatever the run left (remove_tree never raises, either)
            try:
                if workdir is not None:
                    remove_tree(str(workdir))
            finally:
                self._slots.put(slot)

    def _spawn(self, slot: int, workdir: Path, out, err, limits: Limits, uid: int | None,
               fds: tuple[int, ...] = ()) -> ForkedChild:
        """`main.py` in `workdir` run as `main.py 3 4 ...` (the channel's ends `fds`), forked by the
        slot's server: its own session, namespaces, uid, limits, scrubbed environment, no stdin."""
        request = {"workdir": str(workdir), "uid": uid, "limits": asdict(limits), "nfds": len(fds)}
        return self._servers[slot].spawn(request, [out.fileno(), err.fileno(), *fds])


def _close(servers: list[ForkServer], base: str, owner: int, lock: int) -> None:
    if os.getpid() != owner:  # a forked copy of the process that made the pool: not its to close
        return
    try:
        for server in servers:
            server.close()
    finally:  # the lock file goes last: a folder that could not be emptied keeps it for a sweep
        remove_tree(base, last=LOCK)
        os.close(lock)


def _finish(proc: ForkedChild, uid: int | None, out, err, limits: Limits, start: float,
            timed_out: bool) -> ExecResult:
    # Whatever it started goes too, also processes that left the group with setsid(). The pid
    # (and so the group) is not reaped before release(), so it cannot belong to anyone else;
    # unless the server died, and then the pid is left alone.
    if not proc.orphaned:
        _kill_group(proc.pid)
    if uid is not None:
        _kill_uid(uid)
    try:
        proc.wait(timeout=REPORT_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # a stopped server (SIGSTOP from a run of the same uid)
        proc.abandon()
    proc.release()
    wall = time.monotonic() - start
    stdout = _read_head(out, limits.output_bytes)
    stderr = _read_head(err, limits.output_bytes)
    verdict, reason = _classify(proc.returncode, stderr, timed_out)
    return ExecResult(verdict, proc.returncode, stdout, stderr, wall, reason)


def _read_head(file, limit: int) -> str:
    file.seek(0)
    return file.read(limit).decode("utf-8", errors="replace")


_DEFAULT_POOL: SandboxPool | None = None


def default_pool() -> SandboxPool:
    """A process-wide pool sized to the machine's cores (environments share it)."""
    global _DEFAULT_POOL
    if _DEFAULT_POOL is None:
        _DEFAULT_POOL = SandboxPool(max_parallel=max(2, os.cpu_count() or 2))
    return _DEFAULT_POOL
