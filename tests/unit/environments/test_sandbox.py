"""Hostile programs each end in a clear verdict within the limit, and leave nothing behind."""

from __future__ import annotations

import glob
import os
import socket
import time

import psutil
import pytest

from environments.sandbox import Limits, SandboxPool

LIMITS = Limits(wall_s=3.0, cpu_s=3, memory_mb=256, max_processes=16, file_size_mb=1)

HOSTILE = {
    "fork_bomb": ("import os\nwhile True:\n    os.fork()", {"sandbox_violation"}),
    "memory_bomb": ("x = []\nwhile True:\n    x.append(bytearray(1 << 24))", {"sandbox_violation"}),
    "infinite_loop": ("while True:\n    pass", {"timeout"}),
    "huge_output": ("while True:\n    print('x' * 10000)", {"sandbox_violation"}),
    "write_outside": ("open('/work/estuary-escape', 'w').write('pwned')\n"
                      "open('/root/estuary-escape', 'w').write('pwned')",
                      {"sandbox_violation"}),
    "read_parent_env": ("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())",
                        {"sandbox_violation"}),
    "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", {"sandbox_violation"}),
    "exhaust_fds": ("fs = [open(f'f{i}', 'w') for i in range(10000)]", {"sandbox_violation"}),
    "threads": ("import threading, time\nfor _ in range(1000):\n"
                "    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()",
                {"sandbox_violation"}),
}


@pytest.fixture(scope="module")
def pool():
    return SandboxPool(max_parallel=2)


def _sandbox_processes(pool: SandboxPool) -> list[int]:
    """Live processes of the pool's slot uids (other pools on this machine have their own)."""
    return [p.pid for p in psutil.process_iter(["uids"])
            if p.info["uids"] and p.info["uids"].real in pool.uids
            and p.status() != psutil.STATUS_ZOMBIE]


def _leftover_dirs(pool: SandboxPool) -> set[str]:
    """The pool's work folders still on disk (owned by its slot uids; other pools on this machine,
    another test run's included, have their own)."""
    def ours(path: str) -> bool:
        try:
            return not pool.isolated_uid or os.stat(path).st_uid in pool.uids
        except FileNotFoundError:
            return False
    return {p for p in glob.glob(os.path.join(pool.base, "estuary-sbx-*")) if ours(p)}


# Without root the fallback is weaker (README, "Environments"): runs share the caller's uid and
# the host's /tmp, so these hold only where runs get a slot uid and private folders.
NEEDS_ROOT = {"read_parent_env": "a run of the caller's own uid may read its parent's environment"}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_contained(pool, name):
    if name in NEEDS_ROOT and os.geteuid() != 0:
        pytest.skip(NEEDS_ROOT[name])
    code, verdicts = HOSTILE[name]
    dirs_before = _leftover_dirs(pool)
    start = time.monotonic()
    result = pool.run(code, LIMITS)
    elapsed = time.monotonic() - start
    assert result.verdict in verdicts, (name, result)
    assert result.reason
    assert elapsed < LIMITS.wall_s + 3.0
    assert _sandbox_processes(pool) == []
    assert _leftover_dirs(pool) <= dirs_before
    assert not os.path.exists("/work/estuary-escape") and not os.path.exists("/root/estuary-escape")


def test_loopback_connection_is_refused(pool):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    server.settimeout(0.5)
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    result = pool.run(code, LIMITS)
    assert result.verdict == "sandbox_violation" and "connected" not in result.stdout
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()


def test_background_process_does_not_outlive_the_run(pool):
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(300)\n"
            "print('parent exits')")
    result = pool.run(code, LIMITS)
    assert result.verdict == "ok" and "parent exits" in result.stdout
    assert _sandbox_processes(pool) == []


def test_environment_is_scrubbed_and_stdin_closed(pool, monkeypatch):
    monkeypatch.setenv("ESTUARY_SECRET", "hunter2")
    result = pool.run("import os, sys\nprint(sorted(os.environ))\nprint(repr(sys.stdin.read()))", LIMITS)
    assert result.verdict == "ok"
    assert "ESTUARY_SECRET" not in result.stdout and "hunter2" not in result.stdout
    assert "''" in result.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="without root, runs use the host's /tmp")
def test_private_tmp_and_fresh_folder(pool):
    probe = f"estuary-probe-{os.getpid()}-{time.monotonic_ns()}"  # no other run's leftover can match
    write = (f"import os\nfor d in ('/tmp', '/dev/shm'):\n    open(d + '/{probe}', 'w').write('x')\n"
             f"os.mkdir('/tmp/{probe}-dir')\nprint(os.listdir('.'))")
    look = "import os\nprint(sorted(os.listdir('/tmp')), sorted(os.listdir('/dev/shm')), os.listdir('.'))"
    for _ in range(3):  # both slots: each run starts with empty folders, whichever slot ran before
        assert pool.run(write, LIMITS).verdict == "ok"
        seen = pool.run(look, LIMITS)
        assert seen.verdict == "ok" and probe not in seen.stdout, seen
    assert not os.path.exists(f"/tmp/{probe}")  # written to a private tmpfs, now gone


@pytest.mark.skipif(os.geteuid() != 0, reason="the mount namespace needs root")
def test_a_run_sees_its_own_folder_only(pool):
    result = pool.run("import os\nprint(os.listdir(os.path.dirname(os.getcwd())))", LIMITS)
    assert result.verdict == "sandbox_violation" and "forbidden file access" in result.reason


def test_a_run_gets_no_system_v_ipc_and_sees_none_of_the_hosts(pool):
    """System V objects outlive their creator: one run could leave answers in one for the next."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    host_segment = libc.shmget(0, 4096, 0o600)  # IPC_PRIVATE: a segment of the host's namespace
    try:
        code = ("print(open('/proc/sys/kernel/shmmni').read().split(), open('/proc/sys/kernel/msgmni').read().split(),"
                " open('/proc/sys/fs/mqueue/queues_max').read().split())\n"
                "print(len(open('/proc/sysvipc/shm').read().splitlines()))")
        result = pool.run(code, LIMITS)
        assert result.verdict == "ok", result
        limits, rows = result.stdout.splitlines()
        assert limits == "['0'] ['0'] ['0']"  # the slot's own namespace, where nothing can be made
        assert rows == "1"  # the header: the host's segments are not there
    finally:
        if host_segment >= 0:
            libc.shmctl(host_segment, 0, None)  # IPC_RMID
    assert open("/proc/sys/kernel/shmmni").read().strip() != "0"  # the host's limits are untouched


def test_a_run_inherits_no_ctypes_from_the_fork_server(pool):
    from environments.sandbox import guarded

    # Unguarded: the guard refuses gc walks and _ctypes itself, and runs nothing if one was loaded.
    probe = ("import gc, sys\n"
             "left = [n for n in sys.modules if 'ctypes' in n]\n"
             "objs = [o for o in gc.get_objects() if 'ctypes' in getattr(type(o), '__module__', '')]\n"
             "import _ctypes\n"
             "subs = _ctypes.CFuncPtr.__subclasses__() + _ctypes._SimpleCData.__subclasses__()\n"
             "print(left, len(objs), subs)\n")
    result = pool.run(probe, LIMITS)
    assert result.stdout.strip() == "[] 0 []", result
    for module in ("ctypes", "_ctypes"):
        result = pool.run(guarded(f"import {module}\n"), LIMITS)
        assert result.verdict == "sandbox_violation", result
        assert f"import of '{module}' is not allowed in the Estuary sandbox" in result.stderr, result


def test_the_guard_runs_nothing_after_an_escape_hatch_was_imported(pool):
    """A module the guard refuses, imported before it (by the fork server, say), cannot be taken
    back: the guard stops the program instead. A run itself starts with none of them."""
    from environments.sandbox import guarded

    for module in ("_posixsubprocess", "_ctypes", "subprocess"):
        result = pool.run(f"import {module}\n" + guarded("print('ran')"), LIMITS)
        assert result.verdict != "ok" and "ran" not in result.stdout, result
        assert "imported before the guard" in result.stderr, result
    result = pool.run(guarded("print('ran')"), LIMITS)
    assert result.verdict == "ok" and result.stdout == "ran\n", result


def test_pool_runs_two_at_a_time(pool):
    from concurrent.futures import ThreadPoolExecutor

    code = "import time\nstart = time.time()\ntime.sleep(0.3)\nprint(start, time.time())"
    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(lambda _: pool.run(code, LIMITS), range(6)))
    spans = [tuple(map(float, r.stdout.split())) for r in results]
    # The most executions alive at any moment: the pool's bound, and it was reached.
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most == 2
    assert psutil.Process().is_running()


# 1200 folders deep, each name 100 long: past Python's recursion limit, and a path (120 kB) past
# PATH_MAX, so neither a recursive walk nor one by paths can remove it.
DEEP_TREE = ("import os\nfd = os.open('.', os.O_RDONLY)\nfor _ in range(1200):\n"
             "    os.mkdir('d' * 100, dir_fd=fd)\n    nfd = os.open('d' * 100, os.O_RDONLY, dir_fd=fd)\n"
             "    os.close(fd)\n    fd = nfd\nprint('built')")


def test_a_run_that_leaves_a_tree_too_deep_to_recurse_gives_its_slot_back():
    """`shutil.rmtree` recurses once per level: a run's 1200-deep tree raised RecursionError in the
    parent, the slot never went back, and two such runs left a pool with no slot (grading hung)."""
    pool = SandboxPool(max_parallel=1)
    try:
        for _ in range(2):
            result = pool.run(DEEP_TREE, LIMITS)
            assert (result.verdict, result.stdout) == ("ok", "built\n"), result
            assert _leftover_dirs(pool) == set()
        assert pool.run("print('next')", LIMITS).stdout == "next\n"
    finally:
        pool.close()
    assert not os.path.exists(pool.base)


def test_closing_a_pool_removes_a_tree_too_deep_to_recurse():
    """What a run left in the pool's folder (one in flight when the trainer stops) goes with it."""
    import subprocess
    import sys

    pool = SandboxPool(max_parallel=1)
    try:
        subprocess.run([sys.executable, "-c", DEEP_TREE], cwd=pool.base, check=True, capture_output=True)
    finally:
        pool.close()
    assert not os.path.exists(pool.base)


def test_a_reply_that_came_in_time_is_read_however_late_the_parent_looks(pool):
    """A busy parent may get to a reply after the run's deadline: one waiting in the pipe is
    read, not taken for a time-out; one that is not there times out at once, as before."""
    from environments.sandbox_channel import ChannelError

    code = "import os, sys, time\nos.write(int(sys.argv[2]), b'answer\\n')\ntime.sleep(30)"
    with pool.channel(code, Limits(wall_s=1.0, cpu_s=2)) as chan:
        time.sleep(1.5)  # past the deadline
        assert chan.read_line() == b"answer"
        start = time.monotonic()
        with pytest.raises(ChannelError, match="wall-time"):
            chan.read_line()
        assert time.monotonic() - start < 0.5
    assert chan.result.verdict == "timeout", chan.result
