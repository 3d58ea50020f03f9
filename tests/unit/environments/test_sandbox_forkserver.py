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
