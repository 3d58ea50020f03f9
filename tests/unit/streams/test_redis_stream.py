"""The trajectory stream against a real embedded Redis: nothing lost, nothing trained twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import redis

from streams.redis_server import EmbeddedRedis
from streams.redis_stream import StreamUnavailableError, TrajectoryStream
from streams.trajectory import encode

sys.path.insert(0, str(Path(__file__).parent))
from test_trajectory import make_group  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def server():
    with EmbeddedRedis() as s:
        yield s


def test_publish_read_ack_and_depth(server):
    stream = TrajectoryStream(server.url, consumer="a")
    groups = [make_group(seed=i) for i in range(5)]
    for g in groups:
        stream.publish(g)
    assert stream.depth() == 5
    entries = stream.read(count=3)
    assert [e.group.group_id for e in entries] == [g.group_id for g in groups[:3]]
    assert stream.pending() == 3
    stream.ack(entries)
    assert stream.depth() == 2 and stream.pending() == 0
    rest = stream.read(count=10, block_ms=100)
    assert len(rest) == 2 and stream.read(count=1, block_ms=50) == []


def test_entries_of_a_dead_consumer_are_reclaimed(server):
    producer = TrajectoryStream(server.url, consumer="producer")
    groups = [make_group(seed=i) for i in range(6)]
    for g in groups:
        producer.publish(g)
    # A real learner process reads a batch and is killed before acknowledging it.
    code = textwrap.dedent(f"""
        from streams.redis_stream import TrajectoryStream
        s = TrajectoryStream({server.url!r}, consumer="doomed")
        got = s.read(count=4)
        print(len(got), flush=True)
        import time; time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "4"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    survivor = TrajectoryStream(server.url, consumer="survivor", claim_idle_ms=200)
    seen = []
    deadline = time.monotonic() + 10
    while len(seen) < 6 and time.monotonic() < deadline:
        entries = survivor.read(count=10, block_ms=100)
        seen += [e.group.group_id for e in entries]
        survivor.ack(entries)
        time.sleep(0.05)
    assert sorted(seen) == sorted(g.group_id for g in groups)  # all, each once
    assert survivor.pending() == 0 and survivor.depth() == 0


def test_slow_consumer_does_not_reclaim_its_own_batch(server):
    stream = TrajectoryStream(server.url, consumer="slow", claim_idle_ms=50)
    stream.publish(make_group(seed=1))
    first = stream.read(count=1)
    time.sleep(0.2)  # training takes longer than claim_idle_ms
    assert stream.read(count=1, block_ms=50) == []
    stream.ack(first)


def test_duplicates_are_skipped(server):
    stream = TrajectoryStream(server.url, consumer="a")
    group = make_group(seed=7)
    stream.publish(group)
    stream.ack(stream.read(count=1))
    stream.publish(group)  # a producer retried after a lost reply
    assert stream.read(count=1, block_ms=100) == []
    assert stream.depth() == 0


def test_undecodable_entry_goes_to_dead_letters(server):
    stream = TrajectoryStream(server.url, consumer="a")
    client = redis.Redis.from_url(server.url)
    client.xadd(stream.key, {"g": b"\x93garbage"})
    client.xadd(stream.key, {"other": b"x", "id": b"g-other"})
    stream.publish(make_group(seed=2))
    entries = stream.read(count=10)
    assert len(entries) == 1
    dead = stream.dead_letters()
    assert len(dead) == 2 and all(d["reason"] for d in dead)
    assert [d["group"] for d in dead] == ["", "g-other"]  # the id, where the entry carries one
    assert stream.pending() == 1  # only the good one awaits its ack


def test_dropped_groups_are_acknowledged_with_their_reason(server):
    stream = TrajectoryStream(server.url, consumer="a")
    for seed in range(3):
        stream.publish(make_group(seed=seed))
    entries = stream.read(count=3)
    stream.drop(entries[:2], "stale")
    assert stream.pending() == 1 and stream.depth() == 1
    assert stream.dropped() == {entries[0].group.group_id: "stale", entries[1].group.group_id: "stale"}


def test_producer_waits_instead_of_dropping(server):
    stream = TrajectoryStream(server.url, consumer="a", max_len=3)
    for i in range(3):
        stream.publish(make_group(seed=i))
    with pytest.raises(TimeoutError, match="full"):
        stream.publish(make_group(seed=9), timeout_s=0.2)
    done = threading.Event()
    threading.Thread(target=lambda: (stream.publish(make_group(seed=3)), done.set())).start()
    time.sleep(0.3)
    assert not done.is_set()  # blocked on the full backlog
    stream.ack(stream.read(count=1))
    assert done.wait(5)
    assert stream.depth() == 3


def test_producer_waits_while_unread_entries_reach_max_unread(server):
    producer = TrajectoryStream(server.url, consumer="p", max_unread=2)
    learner = TrajectoryStream(server.url, consumer="l")
    producer.publish(make_group(seed=0))
    producer.publish(make_group(seed=1))
    with pytest.raises(TimeoutError, match="2 unread"):
        producer.publish(make_group(seed=2), timeout_s=0.2)
    read = learner.read(count=2)  # read, not acknowledged: the learner trains until a checkpoint
    assert producer.unread() == 0 and producer.depth() == 2
    producer.publish(make_group(seed=3), timeout_s=2)
    producer.publish(make_group(seed=4), timeout_s=2)
    assert producer.depth() == 4 and producer.unread() == 2
    learner.ack(read)
    assert producer.unread() == 2  # acknowledging read entries makes no room for unread ones


def test_redis_restart_with_aof_loses_nothing(tmp_path):
    server = EmbeddedRedis(data_dir=tmp_path / "redis", durable=True).start()
    try:
        stream = TrajectoryStream(server.url, consumer="a", reconnect_s=20)
        groups = [make_group(seed=i) for i in range(4)]
        for g in groups[:3]:
            stream.publish(g)
        in_flight = stream.read(count=1)
        redis.Redis.from_url(server.url).execute_command("BGREWRITEAOF")
        time.sleep(0.5)
        server._kill()  # the server goes away under a live producer and consumer
        producer = threading.Thread(target=stream.publish, args=(groups[3],))
        producer.start()  # retries with backoff until the restarted server answers
        time.sleep(0.5)
        server.start()  # same port and folder: the AOF is replayed
        producer.join(timeout=20)
        assert not producer.is_alive()
        stream.ack(in_flight)
        rest = stream.read(count=10)
        assert sorted(e.group.group_id for e in rest) == sorted(g.group_id for g in groups[1:])
    finally:
        server.stop()


def test_unreachable_redis_is_a_clear_error():
    with pytest.raises(StreamUnavailableError, match="unreachable"):
        TrajectoryStream("redis://127.0.0.1:1/0", reconnect_s=0.5)


def test_entry_payload_is_the_encoded_group(server):
    stream = TrajectoryStream(server.url)
    group = make_group(seed=5)
    entry_id = stream.publish(group)
    fields = redis.Redis.from_url(server.url).xrange(stream.key)[0][1]
    assert fields[b"g"] == encode(group) and entry_id
