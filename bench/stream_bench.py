"""Trajectory stream throughput and latency vs raw redis-py XADD/XREAD of the same bytes.

    .venv/bin/python -m bench.stream_bench [--groups 300]

For trajectory groups of 1k, 8k and 32k tokens (8 samples each, with log-probs, masks and
versions), a producer thread publishes while a consumer thread reads batches of 8 and
acknowledges them, against an embedded Redis. Ours: `TrajectoryStream` (encode, backpressure
check, XADD; XAUTOCLAIM + XREADGROUP, decode + validation, dedupe check, XACK + XDEL). Baseline:
plain XADD of the pre-encoded bytes and XREAD, nothing else. Latency: publish start to decoded
in the consumer.

Prints a table, then `RESULT` lines (groups/s: ratio ours/baseline; p50/p99 latency:
baseline/ours).
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import redis

from streams.redis_server import EmbeddedRedis
from streams.redis_stream import TrajectoryStream
from streams.trajectory import POLICY, Trajectory, TrajectoryGroup, encode


def make_group(tokens: int, seed: int) -> TrajectoryGroup:
    rng = np.random.default_rng(seed)
    n = tokens // 8
    samples = [Trajectory(token_ids=rng.integers(0, 50000, n), loss_mask=np.full(n, POLICY, np.uint8),
                          logprobs=-rng.random(n), versions=np.full(n, 1), reward=1.0)
               for _ in range(8)]
    return TrajectoryGroup(env_id="estuary/math", prompt_id=str(seed), samples=samples)


def ours(url: str, groups: list[TrajectoryGroup], key: str) -> tuple[float, list[float]]:
    producer = TrajectoryStream(url, key=key, consumer="p", max_len=1000)
    consumer = TrajectoryStream(url, key=key, consumer="c")
    sent: dict[str, float] = {}
    latencies: list[float] = []

    def produce():
        for g in groups:
            sent[g.group_id] = time.perf_counter()
            producer.publish(g)

    start = time.perf_counter()
    thread = threading.Thread(target=produce)
    thread.start()
    while len(latencies) < len(groups):
        entries = consumer.read(count=8, block_ms=200)
        now = time.perf_counter()
        latencies += [now - sent[e.group.group_id] for e in entries]
        consumer.ack(entries)
    thread.join()
    return len(groups) / (time.perf_counter() - start), latencies


def raw(url: str, payloads: list[bytes], key: str) -> tuple[float, list[float]]:
    client, reader = redis.Redis.from_url(url), redis.Redis.from_url(url)
    sent: list[float] = []
    latencies: list[float] = []

    def produce():
        for p in payloads:
            sent.append(time.perf_counter())
            client.xadd(key, {"g": p})

    start = time.perf_counter()
    thread = threading.Thread(target=produce)
    thread.start()
    last = "0-0"
    while len(latencies) < len(payloads):
        got = reader.xread({key: last}, count=8, block=200)
        now = time.perf_counter()
        for _, items in got or []:
            for entry_id, _fields in items:
                last = entry_id
                latencies.append(now - sent[len(latencies)])
    thread.join()
    return len(payloads) / (time.perf_counter() - start), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=300)
    args = parser.parse_args()
    rows = []
    with EmbeddedRedis() as server:
        for tokens, label in ((1024, "1k"), (8192, "8k"), (32768, "32k")):
            groups = [make_group(tokens, i) for i in range(args.groups)]
            payloads = [encode(g) for g in groups]
            o_rate, o_lat = ours(server.url, groups, f"bench:{label}:ours")
            r_rate, r_lat = raw(server.url, payloads, f"bench:{label}:raw")
            rows.append((label, len(payloads[0]), o_rate, r_rate, np.percentile(o_lat, 50) * 1e3,
                         np.percentile(r_lat, 50) * 1e3, np.percentile(o_lat, 99) * 1e3,
                         np.percentile(r_lat, 99) * 1e3))
    print(f"{'group':<6} {'bytes':>8} {'ours g/s':>9} {'raw g/s':>9} {'ratio':>6} "
          f"{'p50 ms':>8} {'raw p50':>8} {'p99 ms':>8} {'raw p99':>8}")
    for label, size, orate, rrate, o50, r50, o99, r99 in rows:
        print(f"{label:<6} {size:>8} {orate:>9.1f} {rrate:>9.1f} {orate / rrate:>6.2f} "
              f"{o50:>8.2f} {r50:>8.2f} {o99:>8.2f} {r99:>8.2f}")
    for label, _, orate, rrate, o50, r50, o99, r99 in rows:
        print(f"RESULT stream_groups_per_s_{label} ours={orate:.1f} baseline={rrate:.1f} ratio={orate / rrate:.2f}")
        print(f"RESULT stream_p50_latency_ms_{label} ours={o50:.2f} baseline={r50:.2f} ratio={r50 / o50:.2f}")
        print(f"RESULT stream_p99_latency_ms_{label} ours={o99:.2f} baseline={r99:.2f} ratio={r99 / o99:.2f}")


if __name__ == "__main__":
    main()
