"""The sandbox's fork servers: restarted when they die, loud when a child cannot be set up, gone
with their pool or its process, and never leaving a run behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from environments.sandbox import Limits, SandboxPool
from environments.sandbox_spawn import SandboxSetupError

LIMITS = Limits(wall_s=5.0, cpu_s=5)


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_a_killed_fork_server_is_started_again():
    pool = SandboxPool(max_parallel=1)
    try:
        assert pool.run("print('first')", LIMITS).stdout == "first\n"
        server = pool._servers[0]._proc
        server.kill()
        server.wait()
        result = pool.run("print('second')", LIMITS)
        assert result.verdict == "ok" and result.stdout == "second\n"
        assert pool._servers[0]._proc.pid != server.pid
    finally:
        pool.close()


def test_a_child_that_cannot_be_set_up_is_an_error_in_the_parent():
    pool = SandboxPool(max_parallel=1)
    try:
        request = {"workdir": "/nonexistent/estuary", "uid": None, "nfds": 0,
                   "limits": {"cpu_s": 1, "memory_mb": 64, "file_size_mb": 1, "open_files": 16,
                              "max_processes": 4}}
        with open(os.devnull, "wb") as out:
            with pytest.raises(SandboxSetupError, match="nonexistent"):
                pool._servers[0].spawn(request, [out.fileno(), out.fileno()])
        assert pool.run("print('still serving')", LIMITS).stdout == "still serving\n"
    finally:
        pool.close()


def test_closing_the_pool_stops_its_servers_and_removes_its_folder():
    pool = SandboxPool(max_parallel=2)
    pool.run("pass", LIMITS)
    servers = [s._proc.pid for s in pool._servers if s._proc is not None]
    assert servers and os.path.isdir(pool.base)
    pool.close()
    assert not os.path.exists(pool.base)
    assert _alive(servers) == []


def test_a_run_dies_with_the_process_that_started_it(tmp_path):
    """The parent is killed mid-run: its server sees EOF, kills the run and ends."""
    pids = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import os, threading, time
        import psutil
        from environments.sandbox import Limits, SandboxPool
        pool = SandboxPool(max_parallel=1)
        run = threading.Thread(target=pool.run, args=("import time\\ntime.sleep(60)", Limits(wall_s=60, cpu_s=60)),
                               daemon=True)
        run.start()
        while pool._servers[0]._proc is None or not psutil.Process(pool._servers[0]._proc.pid).children():
            time.sleep(0.01)
        server = psutil.Process(pool._servers[0]._proc.pid)
        with open({str(pids)!r}, "w") as f:
            f.write(f"{{server.children()[0].pid}} {{server.pid}} {{pool.base}}")
        os.kill(os.getpid(), 9)
    """)
    subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), timeout=60)
    run, server, base = pids.read_text().split()
    run_pid, server_pid = int(run), int(server)
    shutil.rmtree(base, ignore_errors=True)  # a killed process cannot remove its pool's folder
    deadline = time.monotonic() + 10
    while _alive([run_pid, server_pid]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _alive([run_pid, server_pid]) == []


@pytest.fixture(scope="module")
def pool():
    pool = SandboxPool(max_parallel=1)
    yield pool
    pool.close()


@pytest.mark.parametrize("code, exit_code, stdout", [
    ("import sys\nsys.exit(2 ** 70)", 255, ""),  # beyond a C long: the interpreter's -1, never 0
    ("import sys\nsys.exit(256 + 3)", 3, ""),
    ("raise KeyboardInterrupt", -2, ""),  # Python dies by SIGINT
    ("import io, sys\nprint('answer 42')\nsys.stdout = io.StringIO()", 0, "answer 42\n"),
    ("class A:\n    def __del__(self):\n        print('bye')\na = A()", 0, "bye\n"),
    ("import atexit\natexit.register(print, 'at exit')\nprint('hi', end=' ')", 0, "hi at exit\n"),
])
def test_a_forked_run_ends_as_python_main_py_would(pool, code, exit_code, stdout):
    result = pool.run(code, LIMITS)
    assert (result.exit_code, result.stdout) == (exit_code, stdout), result


def test_an_error_in_the_parent_mid_run_leaves_the_slot_usable(pool, monkeypatch):
    import environments.sandbox as sandbox

    def interrupted(proc, timeout):
        raise KeyboardInterrupt

    monkeypatch.setattr(sandbox, "wait_exit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pool.run("import time\ntime.sleep(30)", LIMITS)
    monkeypatch.undo()
    start = time.monotonic()
    assert pool.run("print('next')", LIMITS).stdout == "next\n"
    assert time.monotonic() - start < 2


def test_a_stopped_fork_server_is_killed_and_replaced():
    import signal
    import threading

    pool = SandboxPool(max_parallel=1)
    try:
        pool.run("pass", LIMITS)
        server = pool._servers[0]._proc.pid
        # Stopped once the run has started: the server has sent its pid. Stopped while it set the
        # run up (a child forked, no pid sent yet), the parent waits out SETUP_TIMEOUT_S instead:
        # a loaded CI machine hit that window when this waited only for a child to appear.
        started, spawn = threading.Event(), pool._servers[0].spawn
        pool._servers[0].spawn = lambda *a: (spawn(*a), started.set())[0]
        out = {}
        worker = threading.Thread(target=lambda: out.update(r=pool.run("import time\ntime.sleep(30)",
                                                                        Limits(wall_s=1.0, cpu_s=5))))
        worker.start()
        assert started.wait(30)
        os.kill(server, signal.SIGSTOP)  # as a run of the same uid could, without root
        worker.join(timeout=15)
        assert not worker.is_alive() and out["r"].verdict == "timeout"
        assert _alive([server]) == []
        assert pool.run("print('served')", LIMITS).stdout == "served\n"
    finally:
        pool.close()


def test_a_forked_copy_of_the_trainer_leaves_the_pool_alone():
    script = textwrap.dedent("""
        import os, sys
        from environments.sandbox import Limits, SandboxPool
        pool = SandboxPool(max_parallel=1)
        assert pool.run("pass", Limits(wall_s=5)).verdict == "ok"
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # a normal exit runs the finalizers, the pool's among them
        os.waitpid(pid, 0)
        print(pool.run("print('still here')", Limits(wall_s=5)).stdout, end="")
        pool.close()
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), capture_output=True, text=True,
                          timeout=60)
    assert done.stdout == "still here\n", done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the root path")
def test_runs_without_a_slot_uid_get_no_capabilities_even_from_root(monkeypatch):
    import environments.sandbox as sandbox

    monkeypatch.setattr(sandbox, "_pick_python", lambda preferred: None)  # no interpreter a slot uid may run
    pool = SandboxPool(max_parallel=1)
    try:
        assert not pool.isolated_uid
        result = pool.run("print(open('/proc/self/status').read())", LIMITS)
        caps = dict(line.split(":\t") for line in result.stdout.splitlines() if line.startswith("Cap"))
        assert int(caps["CapEff"], 16) == 0 and int(caps["CapPrm"], 16) == 0, result.stdout
        limit = pool.run("print(open('/proc/sys/kernel/shmmni').read().strip())", LIMITS)
        assert limit.stdout.strip() == "0", limit  # the user-namespace path gets its IPC namespace too
    finally:
        pool.close()


def test_runs_cannot_gain_privileges_through_exec(pool):
    result = pool.run("print([l for l in open('/proc/self/status') if l.startswith('NoNewPrivs')])", LIMITS)
    assert result.stdout.strip() == "['NoNewPrivs:\\t1\\n']", result
