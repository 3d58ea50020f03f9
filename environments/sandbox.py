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
environment, `python -I -S` (no site-packages, no user paths), its own process group and
resource limits: CPU time, address space, processes/threads, file size (which also bounds
captured output), open files, no core dumps. Wall time is enforced by the parent.

Isolation that needs privileges is applied when the process has them (root, as in CI and
containers), and the weaker fallback is used otherwise:

| threat | root | unprivileged fallback |
|---|---|---|
| network | new network namespace (no interfaces up) | new user+net namespace if the kernel allows, else `socket` blocked in-process |
| files outside its folder | runs as a per-slot unprivileged uid; private tmpfs over /tmp, /var/tmp, /dev/shm | the folder is its cwd; other writable paths stay writable |
| processes that outlive the run | every process of the slot's uid is killed afterwards | the process group is killed afterwards |
| signalling the parent | different uid: EPERM | not prevented (same uid) |
| reading the parent's environment | env scrubbed; /proc/<parent>/environ unreadable to another uid | env scrubbed |
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import queue
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from environments.sandbox_channel import Channel, wait_exit

IS_ROOT = os.geteuid() == 0
SANDBOX_UID_BASE = 62000  # one uid per pool slot, so a slot's leftovers can be found and killed
SANDBOX_UID_RANGE = 4096
# Pools in other processes (rollout workers on one node, parallel test runs) must never share a
# uid: each kills every process of its uids after a run. A uid is held by an flock on its file.
_UID_LOCKS = Path(tempfile.gettempdir()) / "estuary-sandbox-uids"

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
_MS_REC, _MS_PRIVATE, _MS_NOSUID, _MS_NODEV, _MS_BIND = 0x4000, 0x40000, 0x2, 0x4, 0x1000

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


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6", use_errno=True)


def _try_unshare(flags: int) -> bool:
    return _libc().unshare(flags) == 0


def _private_tmp(workdir: str) -> None:
    """Fresh, small tmpfs over the world-writable folders; the workdir is bound back in place."""
    libc = _libc()
    keep = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None)
    for path in (b"/tmp", b"/var/tmp", b"/dev/shm"):
        if os.path.isdir(path):
            libc.mount(b"tmpfs", path, b"tmpfs", _MS_NOSUID | _MS_NODEV, b"size=16m,mode=1777")
    os.makedirs(workdir, exist_ok=True)
    libc.mount(f"/proc/self/fd/{keep}".encode(), workdir.encode(), None, _MS_BIND, None)
    os.close(keep)


def _child_setup(limits: Limits, workdir: str, uid: int | None) -> None:
    """Runs in the child between fork and exec. Must not raise for optional isolation."""
    os.setsid()
    if uid is not None:
        if _try_unshare(_CLONE_NEWNS | _CLONE_NEWNET):
            _private_tmp(workdir)
    else:
        _try_unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
    mem = limits.memory_mb << 20
    # CPU: SIGXCPU at the soft limit (reported as a timeout), SIGKILL a second later.
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
    for res, value in (
        (resource.RLIMIT_AS, mem),
        (resource.RLIMIT_DATA, mem),
        (resource.RLIMIT_FSIZE, limits.file_size_mb << 20),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, limits.max_processes),
    ):
        resource.setrlimit(res, (value, value))
    os.chdir(workdir)
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def _has_netns(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    except OSError:
        return False


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

    def run(self, code: str, limits: Limits = Limits(), files: dict[str, str] | None = None) -> ExecResult:
        """Execute `code` (a Python program) with `limits`; never raises for what the code does."""
        with self._prepared(code, files or {}) as (workdir, uid, out, err):
            start = time.monotonic()
            proc = self._spawn(workdir, out, err, limits, uid)
            timed_out = wait_exit(proc, limits.wall_s)
            return _finish(proc, uid, out, err, limits, start, timed_out)

    @contextlib.contextmanager
    def channel(self, code: str, limits: Limits = Limits(),
                files: dict[str, str] | None = None) -> Iterator[Channel]:
        """Run `code` as `main.py RFD WFD` with a line pipe each way (see `Channel`).

        The program is stopped when the block ends, or at `limits.wall_s`; then `chan.result`
        says how it ended, as `run` would.
        """
        with self._prepared(code, files or {}) as (workdir, uid, out, err):
            down_r, down_w = os.pipe()
            up_r, up_w = os.pipe()
            try:
                start = time.monotonic()
                proc = self._spawn(workdir, out, err, limits, uid, fds=(down_r, up_w))
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
        workdir = Path(tempfile.mkdtemp(prefix="estuary-sbx-"))
        try:
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
                yield workdir, uid, out, err
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            self._slots.put(slot)

    def _spawn(self, workdir: Path, out, err, limits: Limits, uid: int | None,
               fds: tuple[int, ...] = ()) -> subprocess.Popen:
        return subprocess.Popen(
            [self.python, "-I", "-S", "-B", "main.py", *map(str, fds)],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"},
            preexec_fn=lambda: _child_setup(limits, str(workdir), uid),
            close_fds=True,
            pass_fds=fds,
        )


def _finish(proc: subprocess.Popen, uid: int | None, out, err, limits: Limits, start: float,
            timed_out: bool) -> ExecResult:
    # Whatever it started goes too, also processes that left the group with setsid().
    _kill_group(proc.pid)
    if uid is not None:
        _kill_uid(uid)
    proc.wait()
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
