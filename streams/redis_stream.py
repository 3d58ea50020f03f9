"""The durable trajectory stream on Redis Streams with a consumer group.

    stream = TrajectoryStream(url, key="estuary:trajectories", consumer="learner-0")
    stream.publish(group)                   # producers: waits (never drops) while the backlog is full
    entries = stream.read(count=8)          # learners: reclaimed stale entries first, then new ones
    ...train, commit the step...
    stream.ack(entries)                     # only now: XACK + XDEL + remember the group ids
    stream.drop(entries, "stale")           # or: settled untrained, the reason kept in `<key>:dropped`

- Nothing is lost: an entry stays pending until acknowledged; entries pending longer than
  `claim_idle_ms` on a consumer that died are taken over with XAUTOCLAIM.
- Nothing is trained twice: a group is appended by a server-side script that first adds its id
  to `<key>:published`, so a producer that retries after a lost reply appends nothing; an
  acknowledged entry is deleted at once, so it cannot be delivered again.
- A payload that does not decode goes to `<key>:dead` with the reason and is acknowledged.
- Nothing leaves unaccounted: `<key>:published` holds every group id ever appended, a group the
  learner settles without training (stale, no reward variance) is recorded with its reason in
  `<key>:dropped` in the same transaction as its acknowledgement, and what is neither trained
  nor dropped is still in the stream (`learner.checkpoint.commit_records` names the trained).
- Backpressure: `publish` waits while the stream holds `max_len` unacknowledged entries
  (acknowledged ones are deleted, so the length is the backlog), and while `max_unread` entries
  wait unread: trained entries stay unacknowledged until a checkpoint, so only the unread count
  says whether producers are ahead of the learner (what they make beyond it only goes stale).
- Redis restarts: every call retries with exponential backoff until `reconnect_s` has passed.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis

from streams.trajectory import TrajectoryDecodeError, TrajectoryGroup, decode, encode

T = TypeVar("T")


# Appends a group unless its id was published before; returns {entry id or nil, stream length,
# entries not yet delivered to the consumer group}. Every entry in the stream is unacknowledged
# (acknowledged ones are deleted), so the unread ones are the length less the pending ones.
_APPEND_ONCE = """
local len = redis.call('XLEN', KEYS[1])
local unread = len - redis.call('XPENDING', KEYS[1], ARGV[3])[1]
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return {false, len, unread} end
return {redis.call('XADD', KEYS[1], '*', 'g', ARGV[2], 'id', ARGV[1]), len + 1, unread + 1}
"""


class StreamUnavailableError(RuntimeError):
    """Redis stayed unreachable past the reconnect window."""


@dataclass
class Entry:
    entry_id: str
    group: TrajectoryGroup


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class TrajectoryStream:
    def __init__(self, url: str, key: str = "estuary:trajectories", group: str = "learners",
                 consumer: str | None = None, max_len: int = 10_000, claim_idle_ms: int = 60_000,
                 reconnect_s: float = 30.0, redeliver_own: bool = False, max_unread: int = 0) -> None:
        self.url, self.key, self.group = url, key, group
        self.consumer = consumer or f"{socket.gethostname()}-{time.time_ns()}"
        self.max_len, self.claim_idle_ms, self.reconnect_s = max_len, claim_idle_ms, reconnect_s
        self.max_unread = max_unread  # 0: no bound on the unread entries
        self.dead_key, self.published_key, self.dropped_key = f"{key}:dead", f"{key}:published", f"{key}:dropped"
        self.client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)
        self._append = self.client.register_script(_APPEND_ONCE)
        self._inflight: set[str] = set()  # read by this consumer, not yet acknowledged
        self._full = False  # the last append saw the backlog at max_len
        self._next_claim = 0.0  # monotonic time of the next XAUTOCLAIM scan
        # A restarted consumer (same name) first gets back, in order, what it had read and not
        # acknowledged before it died: a resumed learner re-trains exactly the lost steps.
        self._redeliver_from: str | None = "0" if redeliver_own else None
        self._retry(self._ensure_group)

    # -- resilience ----------------------------------------------------------------------------
    def _retry(self, fn: Callable[[], T]) -> T:
        deadline, delay = time.monotonic() + self.reconnect_s, 0.05
        while True:
            try:
                return fn()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if time.monotonic() > deadline:
                    raise StreamUnavailableError(
                        f"Redis at {self.url} unreachable for {self.reconnect_s:.0f}s ({e}); "
                        "is the server running? (services.redis)") from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            except redis.ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                self._ensure_group()  # a restarted server without persistence lost the group

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # -- producers -----------------------------------------------------------------------------
    def publish(self, group: TrajectoryGroup, timeout_s: float | None = None) -> str | None:
        """Append one group; waits while the backlog is at `max_len` or the unread entries at
        `max_unread` (raises TimeoutError after timeout_s).

        Returns the entry id, or None when a group with this id was published before.

        The backlog is read in the same round trip as the append, and a producer that saw it
        full waits before its next append: the bound is exceeded by at most one entry per producer.
        """
        payload = encode(group)
        if self._full:
            self._wait_for_room(timeout_s)

        entry_id, depth, unread = self._retry(lambda: self._append(
            keys=[self.key, self.published_key], args=[group.group_id, payload, self.group]))
        self._full = self._over(depth, unread)
        return None if entry_id is None else _text(entry_id)

    def _over(self, depth: int, unread: int) -> bool:
        return depth >= self.max_len or (self.max_unread > 0 and unread >= self.max_unread)

    def unread(self) -> int:
        """Entries appended and not yet delivered to any consumer of the group."""
        return self._retry(lambda: self.client.xlen(self.key) - self.client.xpending(self.key, self.group)["pending"])

    def _wait_for_room(self, timeout_s: float | None) -> None:
        start, delay = time.monotonic(), 0.01
        while self._over(self.depth(), self.unread() if self.max_unread > 0 else 0):
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise TimeoutError(f"stream {self.key} stayed full ({self.max_len} entries or {self.max_unread} "
                                   f"unread) for {timeout_s}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        self._full = False

    # -- consumers -----------------------------------------------------------------------------
    def read(self, count: int, block_ms: int | None = 1000) -> list[Entry]:
        """Up to `count` groups: this consumer's own unacknowledged entries (when restarted with
        `redeliver_own`), then stale entries of dead consumers, then new ones, waiting up to
        `block_ms` for new ones (None: not at all)."""
        if self._redeliver_from is not None:
            got = self._retry(lambda: self.client.xreadgroup(
                self.group, self.consumer, {self.key: self._redeliver_from}, count=count))
            raw = [item for _, items in got or [] for item in items]
            if raw:
                self._redeliver_from = _text(raw[-1][0])
                return self._decode_all(raw)
            self._redeliver_from = None
        raw = []
        if time.monotonic() >= self._next_claim:  # stale entries can only appear so often
            raw = self._retry(lambda: self._reclaim(count))
            if len(raw) < count:
                self._next_claim = time.monotonic() + self.claim_idle_ms / 2000
        if len(raw) < count:
            got = self._retry(lambda: self.client.xreadgroup(
                self.group, self.consumer, {self.key: ">"}, count=count - len(raw), block=block_ms))
            raw += [item for _, items in got or [] for item in items]
        return self._decode_all(raw)

    def _reclaim(self, count: int) -> list:
        _, claimed, *_ = self.client.xautoclaim(self.key, self.group, self.consumer,
                                                min_idle_time=self.claim_idle_ms, start_id="0-0", count=count)
        # Deleted entries come back empty; our own in-flight entries are not stale, only slow.
        return [item for item in claimed if item[1] and _text(item[0]) not in self._inflight]

    def _decode_all(self, raw: list) -> list[Entry]:
        decoded, skip, dead = [], [], []
        for entry_id, fields in raw:
            entry_id = _text(entry_id)
            try:
                decoded.append((entry_id, decode(fields[b"g"])))
            except (TrajectoryDecodeError, KeyError) as e:
                reason = str(e) if isinstance(e, TrajectoryDecodeError) else "no payload field"
                group_id = fields.get(b"id", b"") if isinstance(fields, dict) else b""
                dead.append({"entry": entry_id, "group": _text(group_id), "reason": reason})
                skip.append(entry_id)
        if dead:
            def bury():
                pipe = self.client.pipeline(transaction=False)
                for fields_out in dead:
                    pipe.xadd(self.dead_key, fields_out)
                pipe.execute()
            self._retry(bury)
        entries = [Entry(entry_id, group) for entry_id, group in decoded]
        self._inflight.update(e.entry_id for e in entries)
        if skip:
            self._ack_ids(skip)
        return entries

    def ack(self, entries: list[Entry]) -> None:
        """Acknowledge groups whose training step is committed."""
        if entries:
            self._ack_ids([e.entry_id for e in entries])

    def ack_ids(self, entry_ids: list[str]) -> None:
        """Acknowledge by entry ids (a resumed learner settling what its last checkpoint recorded)."""
        if entry_ids:
            self._ack_ids(list(entry_ids))

    def drop(self, entries: list[Entry], reason: str) -> None:
        """Acknowledge groups settled without training, recording each id with `reason` (atomically:
        a dropped group is never both gone from the stream and missing from `<key>:dropped`)."""
        if entries:
            self._ack_ids([e.entry_id for e in entries], {e.group.group_id: reason for e in entries})

    def _ack_ids(self, entry_ids: list[str], dropped: dict[str, str] | None = None) -> None:
        def run():
            pipe = self.client.pipeline(transaction=True)
            pipe.xack(self.key, self.group, *entry_ids)
            pipe.xdel(self.key, *entry_ids)
            if dropped:
                pipe.hset(self.dropped_key, mapping=dropped)
            pipe.execute()
        self._retry(run)
        self._inflight.difference_update(entry_ids)

    # -- inspection ----------------------------------------------------------------------------
    def depth(self) -> int:
        """Unacknowledged entries (waiting or being trained on)."""
        return self._retry(lambda: self.client.xlen(self.key))

    def pending(self) -> int:
        return self._retry(lambda: self.client.xpending(self.key, self.group)["pending"])

    def dead_letters(self) -> list[dict[str, str]]:
        rows = self._retry(lambda: self.client.xrange(self.dead_key))
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in rows]

    def dropped(self) -> dict[str, str]:
        """Group id -> reason of every group settled without training."""
        rows = self._retry(lambda: self.client.hgetall(self.dropped_key))
        return {_text(k): _text(v) for k, v in rows.items()}

    def close(self) -> None:
        self.client.close()
