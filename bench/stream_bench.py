"""Trajectory stream throughput and latency vs raw redis-py XADD/XREAD of the same bytes.

    .venv/bin/python -m bench.stream_bench [--groups 300]

For trajectory groups of 1k, 8k and 32k tokens (8 samples each, with log-probs, masks and
versions), a producer publishes while a consumer reads batches of 8 and
acknowledges them, against an embedded Redis. The producer is another process (as rollout
workers are). Ours: `TrajectoryStream` (encode, backpressure
check, XADD; XAUTOCLAIM + XREADGROUP, decode + validation, dedupe check, XACK + XDEL). Baseline:
plain XADD of the pre-encoded bytes and XREAD, nothing else. Throughput: the producer as fast as
it can. Latency (publish start to decoded in the consumer): a second pass with the producer
paced at `--rate` groups/s, under either side's capacity, so that it shows the stream's own
delay rather than the queue a saturated consumer builds.

Prints a table, then `RESULT` lines (groups/s: ratio ours/baseline; p50/p99 latency:
baseline/ours).
"""

from __future__ import annotations

import argparse
import multiprocessing
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


def _in_child(produce, n: int) -> tuple[multiprocessing.Process, multiprocessing.Queue]:
    """Run `produce(sent)` in a forked process (rollout workers are other processes than the
    learner; threads in one process would also measure GIL contention); it returns the send
    times, by index, through a queue."""
    ctx = multiprocessing.get_context("fork")
    times = ctx.Queue()

    def run():
        sent = [0.0] * n
        produce(sent)
        times.put(sent)

    proc = ctx.Process(target=run)
    proc.start()
    return proc, times


def _pace(i: int, start: float, interval: float) -> None:
    if interval:
        time.sleep(max(0.0, start + i * interval - time.time()))


def ours(url: str, groups: list[TrajectoryGroup], key: str, interval: float = 0.0) -> tuple[float, list[float]]:
    consumer = TrajectoryStream(url, key=key, consumer="c")
    index = {g.group_id: i for i, g in enumerate(groups)}
    received: list[tuple[int, float]] = []

    def produce(sent):
        producer = TrajectoryStream(url, key=key, consumer="p", max_len=1000)
        t0 = time.time()
        for i, g in enumerate(groups):
            _pace(i, t0, interval)
            sent[i] = time.time()
            producer.publish(g)

    start = time.perf_counter()
    proc, times = _in_child(produce, len(groups))
    while len(received) < len(groups):
        entries = consumer.read(count=8, block_ms=200)
        now = time.time()
        received += [(index[e.group.group_id], now) for e in entries]
        consumer.ack(entries)
    rate = len(groups) / (time.perf_counter() - start)
    sent = times.get(timeout=60)
    proc.join()
    return rate, [at - sent[i] for i, at in received]


def raw(url: str, payloads: list[bytes], key: str, interval: float = 0.0) -> tuple[float, list[float]]:
    reader = redis.Redis.from_url(url)
    received: list[float] = []

    def produce(sent):
        client = redis.Redis.from_url(url)
        t0 = time.time()
        for i, p in enumerate(payloads):
            _pace(i, t0, interval)
            sent[i] = time.time()
            client.xadd(key, {"g": p})

    start = time.perf_counter()
    proc, times = _in_child(produce, len(payloads))
    last = "0-0"
    while len(received) < len(payloads):
        got = reader.xread({key: last}, count=8, block=200)
        now = time.time()
        for _, items in got or []:
            for entry_id, _fields in items:
                last = entry_id
                received.append(now)
    rate = len(payloads) / (time.perf_counter() - start)
    sent = times.get(timeout=60)
    proc.join()
    return rate, [at - t0 for at, t0 in zip(received, sent, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=300)
    parser.add_argument("--paced", type=int, default=200, help="groups in the latency pass")
    parser.add_argument("--rate", type=float, default=200.0, help="groups/s in the latency pass")
    args = parser.parse_args()
    rows = []
    with EmbeddedRedis() as server:
        for tokens, label in ((1024, "1k"), (8192, "8k"), (32768, "32k")):
            groups = [make_group(tokens, i) for i in range(args.groups)]
            payloads = [encode(g) for g in groups]
            o_rate, _ = ours(server.url, groups, f"bench:{label}:ours")
            r_rate, _ = raw(server.url, payloads, f"bench:{label}:raw")
            paced = groups[: args.paced]
            _, o_lat = ours(server.url, paced, f"bench:{label}:ours-paced", 1 / args.rate)
            _, r_lat = raw(server.url, payloads[: args.paced], f"bench:{label}:raw-paced", 1 / args.rate)
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
