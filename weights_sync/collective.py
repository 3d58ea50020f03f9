"""Weight sync by torch.distributed broadcast: gloo on CPU, NCCL on GPU, any number of machines.

    store, address = host_rendezvous(host)         # the driver (`weights_sync.membership`)
    # learner rank 0, the publisher
    sync = CollectiveWeightSync(address, rank=0, world_size=1 + n_engines)
    sync.publish(state_dict, version)              # returns once every member engine has it
    # each engine k = 1..n
    sync = CollectiveWeightSync(address, rank=k, world_size=1 + n_engines)
    update = sync.pull(newer_than=engine.version)   # never blocks: the newest complete version
    sync.subscribe(lambda u: engine.update_weights(u.weights, u.version))   # or be told at once

The group is a process group of its own (built on the rendezvous store, not
`init_process_group`), so it lives beside the learners' DeepSpeed group and the engines' own.
Membership comes in generations (`weights_sync.membership`): engines that restart rejoin, a
member that dies is dropped, a restarted publisher carries on, and no rank is ever reused.

A publication is announced in each member's inbox on the store (version, layout id), then the
tensors go out in buckets of at most `bucket_bytes` (one dtype each; a bigger
tensor travels alone, sent from where it lies), packed into two reusable buffers per dtype: no
side ever allocates a whole-model flat buffer. (Sending every tensor of 1 MiB or more alone
instead was no faster at 100M: a broadcast's fixed cost outweighs the copy.) Layouts (buckets,
names, shapes, offsets) go through the store once per new layout. On each engine a receiver
thread blocks on its inbox (never in a collective while idle, so a closed generation or a
restarted publisher reaches it through the store), unpacks each bucket into the new version's own tensors and
only then swaps the version in: the learner never waits for an engine busy generating, and a
partially received update is never served. Versions only go up.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from weights_sync.membership import (
    CLOSED,
    Publisher,
    announce,
    connect,
    counter,
    inbox,
    join,
    new_group,
)
from weights_sync.protocol import Update

log = logging.getLogger(__name__)

# How long an idle engine's inbox wait lasts before it looks at the generation counter itself
# (only a publisher that died and never came back leaves an inbox silent): long, as c10d logs
# each time-out.
IDLE_CHECK_S = 600.0


def bucket_layout(weights: dict[str, torch.Tensor], bucket_bytes: int) -> list[dict]:
    """The state dict as buckets: [{"dtype", "n", "tensors": [[name, shape, start, n], ...]}, ...],
    each of one dtype and at most `bucket_bytes` (a bigger tensor goes alone)."""
    open_: dict[str, dict] = {}  # dtype -> the bucket being filled
    buckets: list[dict] = []
    for name, t in weights.items():
        key, size = str(t.dtype).removeprefix("torch."), t.numel()
        bucket = open_.get(key)
        if bucket is None or (bucket["n"] + size) * t.element_size() > bucket_bytes and bucket["n"]:
            bucket = open_[key] = {"dtype": key, "n": 0, "tensors": []}
            buckets.append(bucket)
        bucket["tensors"].append([name, list(t.shape), bucket["n"], size])
        bucket["n"] += size
    return buckets


def _buffers(layout: list[dict], device: torch.device) -> dict[str, list[torch.Tensor]]:
    """Two reusable packing buffers per dtype (one fills while the other is on the wire), as big as
    that dtype's largest bucket of several tensors (a lone tensor is sent from where it lies)."""
    sizes: dict[str, int] = {}
    for b in layout:
        if len(b["tensors"]) > 1:
            sizes[b["dtype"]] = max(sizes.get(b["dtype"], 0), b["n"])
    return {k: [torch.empty(n, dtype=getattr(torch, k), device=device) for _ in range(2)] for k, n in sizes.items()}


def _users(buffer: torch.Tensor) -> int:
    """How many tensors share `buffer`'s memory (itself included): views hold its storage."""
    return torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) - 1  # less the temporary


class ReceiveBuffers:
    """An engine's receive buffers, reused once nothing outside this pool holds them (CPU only).

    A buffer backs one bucket of one version (the views in its `Update`). It is free again once
    its memory has no other user: the engine copied that version into its model and dropped it,
    and the sync's newest version is a later one. Only what was freed since the last receive is
    kept (a changed layout's buffers go); on CUDA the caching allocator already recycles memory
    without the cost this avoids, so nothing is kept there."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.keep = device.type == "cpu" and hasattr(torch._C, "_storage_Use_Count")
        self._lent: list[torch.Tensor] = []
        self._free: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}

    def reclaim(self) -> None:
        """Before a receive: buffers that only this pool holds become free."""
        lent, self._free = [], {}
        for buffer in self._lent:
            if _users(buffer) == 1:
                self._free.setdefault((buffer.dtype, buffer.numel()), []).append(buffer)
            else:
                lent.append(buffer)
        self._lent = lent

    def take(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        free = self._free.get((dtype, n))
        buffer = free.pop() if free else torch.empty(n, dtype=dtype, device=self.device)
        if self.keep:
            self._lent.append(buffer)
        return buffer


class CollectiveWeightSync:
    def __init__(self, address: str, rank: int, world_size: int, device: str = "cpu",
                 timeout_s: float = 120.0, bucket_bytes: int = 64 << 20, join_window_s: float = 5.0) -> None:
        self.address, self.rank, self.bucket_bytes, self.timeout_s = address, rank, bucket_bytes, timeout_s
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._latest: Update | None = None
        self._subscribers: list[Callable[[Update], None]] = []
        self._stopping = threading.Event()
        self._inbox: str | None = None  # an engine's inbox while it is a member (`close` wakes it)
        self.counters = {"generations": 0, "failed_broadcasts": 0}
        if rank == 0:
            self.store = connect(address, timeout_s)
            self.members = Publisher(self.store, world_size - 1, join_window_s)
            self._group, self._formed, self._size = None, False, 1
            self._layout: list | None = None
            self._layout_id = 0
            self._signature: list | None = None  # names, shapes, dtypes the layout was made for
            # the newest version on this channel, from the store once (a restarted publisher's
            # predecessor may have published): a store read per publish cost a small model 20%
            self._published = int(self.store.get("published")) if self.store.check(["published"]) else -1
            self._buffers: dict[str, list[torch.Tensor]] = {}  # the publisher's reusable packing buffers
            self._receiver = None
        else:
            self._buffers_in = ReceiveBuffers(self.device)
            self._receiver = threading.Thread(target=self._receive_loop, name="weights-receiver", daemon=True)
            self._receiver.start()

    # -- publisher (rank 0) ---------------------------------------------------------------------
    def publish(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Send `version` to every engine of the group (re-formed first if membership changed).
        A member that dies mid-broadcast makes it re-form the group and send once more; if that
        fails too the version is skipped (engines get the next one) rather than stalling training."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 of the sync group publishes")
        if version <= self.latest_version():
            raise ValueError(f"version {version} is not newer than the published {self.latest_version()}")
        layout_id = self._layout_for(weights)
        for attempt in (1, 2):
            try:
                if not self._formed or self.members.changed():
                    self._regroup()
                self._send(weights, version, layout_id)
                break
            except RuntimeError as e:  # gloo: "Connection closed by peer"; a store or rendezvous time-out
                # str(e), never e: a kept log record would keep the traceback, its frames, their
                # broadcasts and so the group alive, and the group must go to release its members
                log.warning("weight broadcast of version %d failed (attempt %d): %s", version, attempt, str(e))
                self.counters["failed_broadcasts"] += 1
                self._drop_group()
        self.store.set("published", str(version))
        self._published = version

    def _layout_for(self, weights: dict[str, torch.Tensor]) -> int:
        signature = [(name, t.shape, t.dtype) for name, t in weights.items()]
        if signature == self._signature:
            return self._layout_id
        self._signature = signature
        layout = bucket_layout(weights, self.bucket_bytes)
        if layout != self._layout:  # ids from the store: unique across publisher restarts
            self._layout_id = int(self.store.add("layouts", 1))
            self._layout = layout
            self.store.set(f"layout-{self._layout_id}", json.dumps(layout))
            self._buffers = _buffers(layout, self.device)
        return self._layout_id

    def _regroup(self) -> None:
        self._drop_group()
        generation, size = self.members.regroup()
        self._size = size
        self.counters["generations"] += 1
        if size > 1:
            self._group = new_group(self.store, generation, 0, size, self.device, self.timeout_s)
        self._formed = True

    def _drop_group(self) -> None:
        # Collecting the group closes its connections, which releases members stuck in it.
        self._group, self._formed = None, False

    def _send(self, weights: dict[str, torch.Tensor], version: int, layout_id: int) -> None:
        if self._group is None:  # nobody to send to (no engine took a ticket in time)
            return
        announce(self.store, self.members.generation, self._size, json.dumps([version, layout_id]))
        in_flight: deque = deque()  # at most two broadcasts: one on the wire while the next is packed
        try:
            with torch.no_grad():
                for i, bucket in enumerate(self._layout):
                    while len(in_flight) > 1:  # bucket i - 2, the last user of packing buffer i % 2, is done
                        in_flight.popleft().wait()
                    in_flight.append(self._group.broadcast(self._flat(i, bucket, weights), 0))
                while in_flight:
                    in_flight.popleft().wait()
        finally:
            in_flight.clear()  # a failed broadcast's work must not outlive the group it holds

    def _flat(self, i: int, bucket: dict, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Bucket `i` as one flat tensor: a lone tensor as it lies, several packed into buffer i % 2."""
        if len(bucket["tensors"]) == 1:
            return weights[bucket["tensors"][0][0]].detach().reshape(-1).to(self.device).contiguous()
        buffer = self._buffers[bucket["dtype"]][i % 2][: bucket["n"]]
        # one copy kernel for the bucket, not one per tensor (a tiny model's 53 copy_ calls took
        # 0.6 ms a publish in cProfile; one cat of the same bytes takes 0.3 ms in broadcast_bench);
        # `.to` is a no-op unless the weights live elsewhere (a GPU learner on a gloo channel)
        return torch.cat([weights[name].reshape(-1).to(buffer.device) for name, *_ in bucket["tensors"]],
                         out=buffer)

    def latest_version(self) -> int:
        """The publisher: the newest version ever published on this channel (a restarted
        publisher sees its predecessor's); an engine: the newest it holds."""
        if self.rank == 0:
            return self._published
        with self._lock:
            return -1 if self._latest is None else self._latest.version

    # -- engines (rank > 0) ---------------------------------------------------------------------
    def _receive_loop(self) -> None:
        try:
            store = connect(self.address, self.timeout_s)
            waiting = store.clone()  # the inbox's own client: its wait may outlast `timeout_s`
            waiting.set_timeout(timedelta(seconds=IDLE_CHECK_S))
            store.add("joins", 1)  # a new engine, or a restarted one: the publisher re-forms the group
        except RuntimeError as e:
            log.error("cannot reach the weight-sync rendezvous at %s: %s", self.address, e)
            return
        layouts: dict[int, list] = {}
        generation = 0
        while not self._stopping.is_set():
            try:
                member = join(store, generation, self._stopping.is_set)
            except RuntimeError as e:  # the store is gone: the driver, and so the run, has ended
                log.info("weight-sync rendezvous closed: %s", str(e))
                return
            if member is None:
                return
            generation, rank, size = member
            try:
                group = new_group(store, generation, rank, size, self.device, self.timeout_s)
                self._serve(store, waiting, group, generation, rank, layouts)
            except RuntimeError as e:  # the publisher or another member died: wait for the next generation
                log.info("left weight-sync generation %d: %s", generation, str(e))
            group = None

    def _serve(self, store, waiting, group, generation: int, rank: int, layouts: dict[int, list]) -> None:
        """Receive every version announced to this member of `generation` until it closes."""
        key = inbox(generation, rank)
        with self._lock:
            self._inbox = key
        while not self._stopping.is_set():
            try:
                message = waiting.queue_pop(key)
            except dist.DistStoreError:  # silent for IDLE_CHECK_S: still the newest generation?
                if counter(store, "gen") != generation:
                    return
                continue
            if message == CLOSED or self._stopping.is_set():
                return
            version, layout_id = json.loads(message)
            if layout_id not in layouts:
                layouts[layout_id] = json.loads(store.get(f"layout-{layout_id}"))
            self._take(Update(version=version, weights=self._receive(group, layouts[layout_id])))

    def _receive(self, group, layout: list[dict]) -> dict[str, torch.Tensor]:
        """One version, bucket by bucket, straight into tensors of its own (views of one buffer
        per bucket, none shared with a version anyone still holds): the served version is
        untouched, and nothing is copied twice. The next bucket's receive is posted before the
        current one is waited for, as the publisher keeps two in flight."""
        weights, in_flight = {}, deque()
        self._buffers_in.reclaim()
        for bucket in layout:
            buffer = self._buffers_in.take(getattr(torch, bucket["dtype"]), bucket["n"])
            in_flight.append(group.broadcast(buffer, 0))
            for name, shape, start, n in bucket["tensors"]:
                weights[name] = buffer[start: start + n].view(shape)
            if len(in_flight) > 1:
                in_flight.popleft().wait()
        while in_flight:
            in_flight.popleft().wait()
        return weights

    def _take(self, update: Update) -> None:
        with self._lock:  # swapped in only once complete, and only forwards
            if self._latest is not None and update.version <= self._latest.version:
                return
            self._latest = update
            subscribers = list(self._subscribers)
        for fn in subscribers:
            try:
                fn(update)
            except Exception:  # a subscriber's bug must not end the receiver (the publisher would stall)
                log.exception("a weight-update subscriber failed on version %d", update.version)

    def subscribe(self, fn: Callable[[Update], None]) -> None:
        """Call `fn(update)` from the receiver thread as each version arrives (it must not block:
        the publisher's next broadcast waits for this thread)."""
        with self._lock:
            self._subscribers.append(fn)

    def pull(self, newer_than: int) -> Update | None:
        with self._lock:
            latest = self._latest
        return latest if latest is not None and latest.version > newer_than else None

    def close(self) -> None:
        """Leave the group: the publisher drops it (members go back to waiting for a generation);
        an engine's receiver is woken through its inbox and stops."""
        self._stopping.set()
        if self.rank == 0:
            self._drop_group()
        elif self._receiver is not None:
            with self._lock:
                key = self._inbox
            if key is not None:
                try:
                    connect(self.address, 5).queue_push(key, "stop")
                except RuntimeError:  # the store is gone: so is the receiver's wait
                    pass
            self._receiver.join(timeout=5)
