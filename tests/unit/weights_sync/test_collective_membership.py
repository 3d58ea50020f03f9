"""The collective group re-forms around engines that die and restart, and around a restarted publisher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from weights_sync.membership import counter, host_rendezvous
from weights_sync.protocol import make_weight_sync

ROOT = Path(__file__).resolve().parents[3]

ENGINE = textwrap.dedent("""
    import sys, time, torch
    from weights_sync.protocol import make_weight_sync

    N = 1 << 20
    sync = make_weight_sync("collective", sys.argv[1], rank=int(sys.argv[2]), world_size=3)
    seen = []

    def received(update):  # every version the receiver takes, not only those a poll happens to catch
        right = torch.equal(update.weights["w"], torch.full((N,), float(update.version)))
        # printed before it is recorded: the main thread's last print must not cut into this line
        print("version", update.version, "right" if right else "WRONG", flush=True)
        seen.append(update.version)

    sync.subscribe(received)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not seen or seen[-1] < 5):
        time.sleep(0.01)
    print("seen", seen, flush=True)
    sync.close()
""")


def _engine(address: str, rank: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ENGINE, address, str(rank)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _weights(version: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((1 << 20,), float(version)), "step": torch.tensor(version)}


def _wait_for(predicate, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _seen(log: str) -> list[int]:
    """The versions an engine received, each checked to hold its own weights."""
    lines = [line.split() for line in log.splitlines() if line.startswith("version ")]
    assert all(right == "right" for _, _, right in lines), log
    return [int(version) for _, version, _ in lines]


def test_engines_and_the_publisher_rejoin_after_kill_9_and_versions_only_go_up():
    store, address = host_rendezvous("127.0.0.1")
    a, b = _engine(address, 1), _engine(address, 2)
    publisher = make_weight_sync("collective", address, rank=0, world_size=3, join_window_s=120)
    try:
        _wait_for(lambda: counter(store, "joins") == 2, "both engines' joins")  # else a later re-form looks needed
        publisher.publish(_weights(1), 1)  # the first generation waits for both engines
        publisher.members.window_s = 2.0  # later ones: a dead engine is not waited for long
        os.kill(b.pid, signal.SIGKILL)
        b.wait()
        publisher.publish(_weights(2), 2)  # fails on the dead member, re-forms without it, resends
        assert publisher.counters["failed_broadcasts"] == 1 and publisher.counters["generations"] == 2
        publisher.publish(_weights(3), 3)
        b2 = _engine(address, 2)  # Ray would restart it: a new process, no rank to take back
        _wait_for(lambda: counter(store, "joins") >= 3, "the restarted engine's join")
        _wait_for(lambda: publisher._dirty, "the publisher's watcher to see that join")  # off the publish path
        publisher.publish(_weights(4), 4)
        publisher.close()
        publisher = make_weight_sync("collective", address, rank=0, world_size=3, join_window_s=60)
        assert publisher.latest_version() == 4  # a restarted publisher never goes back
        publisher.publish(_weights(5), 5)
        logs = [p.communicate(timeout=240)[0] for p in (a, b2)]
    finally:
        publisher.close()
        for p in (a, b):
            p.kill()
    assert _seen(logs[0]) == [1, 2, 3, 4, 5], logs[0]
    assert _seen(logs[1]) == [4, 5], logs[1]  # joined at the first publication after it started
    assert counter(store, "gen") >= 4  # first, without the dead one, with the restarted one, new publisher
