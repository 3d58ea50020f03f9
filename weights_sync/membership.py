"""Who is in the collective weight-sync group: generations of a fixed-size group, formed through one store.

    store, address = host_rendezvous("10.0.0.1")          # the driver: lives as long as the run
    # learner rank 0 (publisher), at its next broadcast after its watcher saw `Publisher.changed()`:
    generation, size = publisher.regroup()
    # each engine, in its receiver thread:
    generation, rank, size = join(store, after=previous, stop=stopping)

A torch.distributed group has a fixed size and rank set, and an engine that Ray restarts is a new
process that cannot take its old rank back. So the group lives in generations: when an engine
(re)starts it says so (`joins` goes up), and before its next broadcast the publisher opens a
new generation. Every live engine takes a ticket in it (its rank); after `window_s`, or once
every expected engine has one, the publisher fixes the size and everyone builds that
generation's group (gloo on CPU, NCCL on GPU) under its own key prefix. An engine that comes too
late asks for the next generation; a broadcast that fails (a member died) makes the publisher
drop the group, which releases the other members, and open a new generation. A restarted
publisher (a resumed learner) simply opens the next generation. No rank is ever re-used.

The store is hosted by the driver, not by a member: it must outlive the learner and every engine.

Store keys:
  joins            counter: +1 when an engine starts, or finds itself left out of a generation
  events           queue: "join" after each of those, "leave:<G>" when a member of G closes; the
                   publisher's watcher thread pops them, so its broadcasts never ask the store
                   whether membership changed (a round trip a publish)
  gen              counter: the current generation (the publisher adds 1 to open the next)
  g<G>/tickets     counter: an engine's ticket in generation G is its rank (1, 2, ...)
  g<G>/size        set by the publisher when G stops taking tickets: 1 + the tickets taken by then
  g<G>/pg/...      generation G's process-group rendezvous (`g<G>/ctl/...`: its gloo control
                   group on CUDA)
  layout-<id>      a bucket layout (`weights_sync.buckets`), written once per new layout
  layout           the current layout's id: a generation's members post receives for it

A member waits for the next publication inside its generation's group (on CPU the next
version's receives stay posted, `weights_sync.collective`), so nothing on the store lies on a
publication's path. The publisher ends a generation by dropping its group: closing its connections fails the
members' pending receives at once, and they ask for the next generation. A publisher that dies
ends it the same way, through the kernel.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist

POLL_S = 0.01  # how often a waiting side looks at the store (a round trip on loopback is ~0.1 ms)


def host_rendezvous(host: str, port: int = 0) -> tuple[dist.TCPStore, str]:
    """A store server for the group's rendezvous (port 0: a free one); returns it and `tcp://host:port`.
    Keep the store object alive as long as the run: its server stops when it is collected."""
    store = dist.TCPStore(host, port, None, True, timedelta(seconds=60), wait_for_workers=False)
    return store, f"tcp://{host}:{store.port}"


def connect(address: str, timeout_s: float) -> dist.TCPStore:
    """A client of the rendezvous store at `tcp://host:port`."""
    url = urlparse(address)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"collective weight sync needs an address like tcp://host:port; got {address!r}")
    return dist.TCPStore(url.hostname, url.port, None, False, timedelta(seconds=timeout_s))


def counter(store: dist.TCPStore, key: str) -> int:
    return int(store.add(key, 0))


def new_group(store: dist.TCPStore, generation: int, rank: int, size: int, device: torch.device,
              timeout_s: float, name: str = "pg"):
    """Generation `generation`'s process group `name` (blocks until every member has joined it)."""
    prefixed = dist.PrefixStore(f"g{generation}/{name}/", store)
    if device.type == "cuda":  # NCCL's own timeout (its watchdog ends a process stuck past it)
        return dist.ProcessGroupNCCL(prefixed, rank, size)
    return dist.ProcessGroupGloo(prefixed, rank, size, timedelta(seconds=timeout_s))


class Publisher:
    """The publisher's side of the membership: notices joins and opens generations."""

    def __init__(self, store: dist.TCPStore, engines: int, window_s: float) -> None:
        self.store, self.engines, self.window_s = store, engines, window_s
        self.joins_seen = -1  # -1: no generation opened yet
        self.generation = 0

    def changed(self) -> bool:
        """An engine (re)started, or one was left out, since the current generation opened."""
        return counter(self.store, "joins") != self.joins_seen

    def regroup(self) -> tuple[int, int]:
        """Open the next generation and close it after `window_s` (or once every expected engine
        holds a ticket); returns (generation, size). Engines taking a ticket after the close get
        a rank >= size: they are not members and ask for the next generation."""
        generation = int(self.store.add("gen", 1))
        tickets, deadline = f"g{generation}/tickets", time.monotonic() + self.window_s
        while counter(self.store, tickets) < self.engines and time.monotonic() < deadline:
            time.sleep(POLL_S)
        # Read before closing: every join counted here came before the close, so its engine holds a
        # ticket or finds itself left out and joins again after it, which the next read counts.
        self.joins_seen = counter(self.store, "joins")
        size = 1 + counter(self.store, tickets)
        self.store.set(f"g{generation}/size", str(size))
        self.generation = generation
        return generation, size


EVENTS = "events"


def note_join(store: dist.TCPStore) -> None:
    """An engine (re)started or was left out: the publisher re-forms before its next broadcast."""
    store.add("joins", 1)
    store.queue_push(EVENTS, "join")


def note_leave(store: dist.TCPStore, generation: int) -> None:
    """An engine of `generation` is closing: the publisher drops that generation's group, which
    releases its pending receive (a leave from an older generation is ignored)."""
    store.queue_push(EVENTS, f"leave:{generation}")


def join(store: dist.TCPStore, after: int, stop: Callable[[], bool]) -> tuple[int, int, int] | None:
    """An engine's membership of the first generation newer than `after` that takes it in:
    (generation, rank, size), or None once `stop()` says so."""
    while not stop():
        generation = counter(store, "gen")
        if generation <= after:
            time.sleep(POLL_S)
            continue
        rank = int(store.add(f"g{generation}/tickets", 1))
        size = _closed_size(store, generation, stop)
        if size is not None and rank < size:
            return generation, rank, size
        after = generation
        if size is not None:  # closed before our ticket: ask the publisher for another generation
            note_join(store)
    return None


def _closed_size(store: dist.TCPStore, generation: int, stop: Callable[[], bool]) -> int | None:
    """Generation `generation`'s size once the publisher closes it; None if a newer generation
    opened first (its publisher died before closing it) or we are stopping."""
    key = f"g{generation}/size"
    while not stop():
        if store.check([key]):
            return int(store.get(key))
        if counter(store, "gen") != generation:
            return None
        time.sleep(POLL_S)
    return None
