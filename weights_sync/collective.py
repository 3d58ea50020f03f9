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

Each member waits for the next publication inside the group: on CPU its receiver thread keeps
the next version's receives posted, so a publication touches no store on its way (a store round
trip is ~0.2 ms, a tiny model's whole broadcast 1.2 ms) and is nothing but its data. The tensors
go in buckets of at most `bucket_bytes` (`weights_sync.buckets`): a run of tensors that lie end
to end in memory (DeepSpeed's flat buffers) is sent from where it lies, the rest packed into two
reusable byte buffers, the first packed bucket opening with the version. No side ever allocates
a whole-model flat buffer. A run sent from where it lies cannot carry the version, and a second
broadcast beside a small model's run costs ~15%: so a generation whose second publication came a
stride after its first, its packed tensors unchanged (the routers the learner freezes), is promised
that stride, and its later publications are their runs alone (members count the versions and
keep the packed tensors). A publication that breaks the promise opens a new generation. Layouts
go through the store once per new layout, and a new layout opens a new generation (its members
post receives for one layout). The receiver unpacks each
bucket into the new version's own tensors and only then swaps the version in: the learner
never waits for an engine busy generating, and a partially received update is never served.
Versions only go up. The price of receives posted ahead: an idle CPU engine holds the buffers of
the version it serves and of the next one (one more copy of the model's weights than receiving on
demand would hold between publications).

Membership changes reach the publisher's watcher thread through the store's `events` queue
(`weights_sync.membership`), off the publication's path: a join makes the next publication
re-form the group first; an engine that closes asks the watcher to drop the group, which fails
its pending receives (gloo cannot abort a pending receive from the receiving side), and
the other members ask for the next generation. On CUDA the data goes over NCCL and the header
over a gloo group of the same generation: an idle NCCL receive would trip NCCL's watchdog.
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

from weights_sync.buckets import (
    ReceiveBuffers,
    bucket_layout,
    header,
    header_bucket,
    lying,
    pack,
    packed_names,
    packing_buffers,
    unpack,
)
from weights_sync.membership import (
    EVENTS,
    Publisher,
    connect,
    join,
    new_group,
    note_join,
    note_leave,
)
from weights_sync.protocol import Update

log = logging.getLogger(__name__)

# How long an idle engine's header receive lasts before it leaves the group and asks for a newer
# generation (only a publisher whose machine vanished without closing its connections leaves it
# waiting): long, as gloo logs each time-out, and the publisher's next broadcast re-forms.
IDLE_CHECK_S = 600.0

# A broken promise (`CollectiveWeightSync._promise`) costs a new generation, ~50 ms here against
# the ~0.15 ms a promise saves a small model's publication: a publisher whose versions keep
# breaking it (an irregular cadence) stops promising after this many.
PROMISES_BROKEN_MAX = 3


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes: equal bits, where `torch.equal` calls -0.0 and 0.0 equal and NaN unequal."""
    return t.detach().reshape(-1).view(torch.uint8)


def _idle_options() -> dist.BroadcastOptions:
    """A receive that may wait while the publisher is idle: up to IDLE_CHECK_S."""
    options = dist.BroadcastOptions()
    options.rootRank, options.timeout = 0, timedelta(seconds=IDLE_CHECK_S)
    return options


class CollectiveWeightSync:
    def __init__(self, address: str, rank: int, world_size: int, device: str = "cpu",
                 timeout_s: float = 120.0, bucket_bytes: int = 64 << 20, join_window_s: float = 5.0,
                 lie_bytes: int = 64 << 10) -> None:
        self.address, self.rank, self.bucket_bytes, self.timeout_s = address, rank, bucket_bytes, timeout_s
        self.lie_bytes = lie_bytes  # a run of tensors end to end this big is sent from where it lies
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._latest: Update | None = None
        self._subscribers: list[Callable[[Update], None]] = []
        self._stopping = threading.Event()
        self.counters = {"generations": 0, "failed_broadcasts": 0, "broken_promises": 0}
        if rank == 0:
            self.store = connect(address, timeout_s)
            self.members = Publisher(self.store, world_size - 1, join_window_s)
            self._group = self._control = None
            self._formed, self._size, self._dirty = False, 1, False
            self._layout: list | None = None
            self._layout_id = 0
            self._signature: list | None = None  # names, shapes, strides, dtypes, addresses of its layout
            # the newest version on this channel, from the store once (a restarted publisher's
            # predecessor may have published): a store read per publish cost a small model 20%
            self._published = int(self.store.get("published")) if self.store.check(["published"]) else -1
            self._buffers: list[torch.Tensor] = []  # the publisher's two reusable packing buffers
            self._sent = 0  # publications sent in the current generation
            self._last_version = -1  # the last of them
            self._stride = 0  # promised to the generation: its publications are runs alone, this far apart
            self._held: dict[str, torch.Tensor] | None = None  # packed tensors as the generation first got them
            self._token = f"stop-{id(self)}-{threading.get_ident()}"
            self._watcher = threading.Thread(target=self._watch, name="weights-membership", daemon=True)
            self._watcher.start()
            self._receiver = None
        else:
            self.generation = 0  # the generation this engine is (or was last) a member of
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
        with self._lock:  # the watcher drops the group only between publications
            layout_id = self._layout_for(weights)
            if not self._watcher.is_alive() and self._formed and self.members.changed():
                self._dirty = True  # no watcher (its store client failed): look on the way
            if self._formed and not self._dirty and self._stride and not self._keeps_promise(weights, version):
                self._dirty = True  # members wait for a run alone, this version and packed tensors as held
                self.counters["broken_promises"] += 1
            for attempt in (1, 2):
                try:
                    if not self._formed or self._dirty:
                        self._regroup()
                    self._send(weights, version, layout_id)
                    break
                except RuntimeError as e:  # gloo: "Connection closed by peer"; a store or rendezvous time-out
                    # str(e), never e: a kept log record would keep the traceback, its frames, their
                    # broadcasts and so the group alive, and the group must go to release its members
                    log.warning("weight broadcast of version %d failed (attempt %d): %s", version, attempt, str(e))
                    self.counters["failed_broadcasts"] += 1
                    self._drop_group()
                except BaseException:  # members hold receives for the rest of this version: end them
                    self._drop_group()
                    raise
        self.store.set("published", str(version))
        self._published = version

    def _watch(self) -> None:
        """The publisher's watcher: turns the store's membership events into a re-form at the next
        publication (a join) or a dropped group now (a leave: it releases that engine's receive)."""
        try:
            events = connect(self.address, self.timeout_s)
            events.set_timeout(timedelta(seconds=IDLE_CHECK_S))
        except RuntimeError as e:  # `publish` checks membership itself while this thread is dead
            log.warning("the weight-sync watcher cannot reach the store: %s", str(e))
            return
        while not self._stopping.is_set():
            try:
                event = events.queue_pop(EVENTS)
            except dist.DistStoreError:  # quiet for IDLE_CHECK_S
                continue
            except RuntimeError as e:  # the store is gone: the driver, and so the run, has ended
                log.info("weight-sync rendezvous closed: %s", str(e))
                return
            with self._lock:
                if event == f"leave:{self.members.generation}".encode():  # not a stale one: it would
                    self._drop_group()  # release a healthy group, and the next one waits its window
                elif event == b"join" and self._formed and self.members.changed():
                    self._dirty = True
                # anything else: this publisher's own stop (`close`), or a predecessor's left unread

    def _layout_for(self, weights: dict[str, torch.Tensor]) -> int:
        # where each tensor lies too: a run sent from where it lies must still be one
        signature = [(name, t.shape, t.stride(), t.dtype, t.data_ptr()) for name, t in weights.items()]
        if signature == self._signature:
            return self._layout_id
        self._signature = signature
        layout = bucket_layout(weights, self.bucket_bytes, self.lie_bytes)
        if layout != self._layout:  # ids from the store: unique across publisher restarts
            self._layout_id = int(self.store.add("layouts", 1))
            self._layout = layout
            self.store.set(f"layout-{self._layout_id}", json.dumps(layout))
            self.store.set("layout", str(self._layout_id))
            self._buffers = packing_buffers(layout, self.device)
            self._dirty = True  # members post receives for their generation's layout: a new one
        return self._layout_id

    def _regroup(self) -> None:
        self._drop_group()
        self._dirty = False  # before regroup: a join during it is seen by the watcher afterwards
        generation, size = self.members.regroup()
        self._size, self._sent, self._stride, self._held = size, 0, 0, None
        self.counters["generations"] += 1
        if size > 1:
            self._group = new_group(self.store, generation, 0, size, self.device, self.timeout_s)
            self._control = self._group if self.device.type == "cpu" else new_group(
                self.store, generation, 0, size, torch.device("cpu"), self.timeout_s, name="ctl")
        self._formed = True

    def _drop_group(self) -> None:
        # Collecting the group closes its connections, which releases members waiting in it.
        self._group = self._control = None
        self._formed = False

    def _send(self, weights: dict[str, torch.Tensor], version: int, layout_id: int) -> None:
        if self._group is None:  # nobody to send to (no engine took a ticket in time)
            return
        promised = self._stride  # members expect this publication's runs alone
        stride = promised or self._promise(weights, version)
        head = (version, layout_id, stride)
        in_flight: deque = deque()  # at most two broadcasts: one on the wire while the next is packed
        try:
            with torch.no_grad():
                if self._control is not self._group:  # CUDA: the header over gloo, first, and
                    # waited for: a member gone shows here, before any NCCL op is in flight
                    self._control.broadcast(torch.tensor(head, dtype=torch.int64), 0).wait()
                carrier = header_bucket(self._layout)
                for i, bucket in enumerate(self._layout):
                    if promised and not bucket["lies"]:
                        break  # lying buckets come first
                    while len(in_flight) > 1:  # bucket i - 2, the last user of packing buffer i % 2, is done
                        in_flight.popleft().wait()
                    flat = lying(bucket, weights) if bucket["lies"] else \
                        pack(self._buffers[i % 2], bucket, weights, head if i == carrier else None)
                    in_flight.append(self._group.broadcast(flat.to(self.device), 0))
                while in_flight:
                    in_flight.popleft().wait()
            self._sent, self._last_version, self._stride = self._sent + 1, version, stride
        finally:
            in_flight.clear()  # a failed broadcast's work must not outlive the group it holds

    def _promise(self, weights: dict[str, torch.Tensor], version: int) -> int:
        """The stride to promise at a publication sent whole (0: none). The version is the one
        message a run sent from the learner's memory cannot carry: a second broadcast beside a
        small model's run costs it ~15%. Promised at a generation's second publication, on CPU
        (NCCL's header goes over gloo anyway), when its packed tensors (the routers the learner
        freezes: at most `bucket_bytes`) are bit for bit what its first publication sent; members then count
        versions and keep those tensors. A publication that breaks it opens a new generation."""
        if (self._sent > 1 or self._control is not self._group or not any(b["lies"] for b in self._layout)
                or self.counters["broken_promises"] >= PROMISES_BROKEN_MAX):
            return 0
        names = packed_names(self._layout)
        if self._sent == 0 and sum(weights[n].nbytes for n in names) <= self.bucket_bytes:
            self._held = {n: _bits(weights[n]).clone() for n in names}
        elif self._sent == 1 and self._held is not None and self._unchanged(weights):
            return version - self._last_version
        return 0

    def _unchanged(self, weights: dict[str, torch.Tensor]) -> bool:
        assert self._held is not None
        return all(n in weights and torch.equal(_bits(weights[n]), held) for n, held in self._held.items())

    def _keeps_promise(self, weights: dict[str, torch.Tensor], version: int) -> bool:
        return version == self._last_version + self._stride and self._unchanged(weights)

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
            note_join(store)  # a new engine, or a restarted one: the publisher re-forms the group
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
            self.generation = generation
            try:
                group = new_group(store, generation, rank, size, self.device, self.timeout_s)
                control = group if self.device.type == "cpu" else new_group(
                    store, generation, rank, size, torch.device("cpu"), self.timeout_s, name="ctl")
                self._serve(store, group, control, layouts)
            except RuntimeError as e:  # the publisher dropped the group, or it or another member died,
                log.info("left weight-sync generation %d: %s", generation, str(e))  # or idle time-out
                try:
                    if not self._stopping.is_set():
                        # tells the publisher's watcher, for the case it does not know (an idle
                        # time-out): its next publication re-forms instead of failing on us first
                        note_join(store)
                except RuntimeError as gone:  # the store is gone: the driver, and so the run, has ended
                    log.info("weight-sync rendezvous closed: %s", str(gone))
                    return
            group = control = None

    def _serve(self, store, group, control, layouts: dict[int, list]) -> None:
        """Receive every version published to this member until the group ends (an error).

        A generation has one layout (the publisher re-forms on a new one), so on CPU the next
        version's receives are posted as soon as the last is in, and wait while idle: the
        version travels in the first bucket. NCCL's are posted once a header has come over the
        gloo control group (an idle NCCL receive would trip its watchdog)."""
        layout_id = int(store.get("layout"))  # the publisher sets it before opening a generation
        if layout_id not in layouts:
            layouts[layout_id] = json.loads(store.get(f"layout-{layout_id}"))
        layout, idle = layouts[layout_id], _idle_options()
        runs = [bucket for bucket in layout if bucket["lies"]]
        head = torch.zeros(3, dtype=torch.int64)
        version, stride, kept = 0, 0, {}
        while not self._stopping.is_set():
            if control is not group:
                control.broadcast([head], idle).wait()
            first, weights, works = self._post(group, runs if stride else layout, idle if control is group else None)
            for work in works:
                work.wait()
            if self._stopping.is_set():
                return
            if stride:  # promised: the runs alone, the version counted, the packed tensors kept
                version += stride
                weights.update(kept)
            else:
                version, sent_layout, stride = header(first.cpu())
                if sent_layout != layout_id:
                    raise RuntimeError(f"layout {sent_layout} sent in a generation of layout {layout_id}")
                kept = {name: weights[name] for name in packed_names(layout)} if stride else {}
            self._take(Update(version=version, weights=weights))

    def _post(self, group, layout: list[dict], options) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], list]:
        """One version's receives, into buffers of its own (none shared with a version anyone
        still holds): the served version is untouched, and nothing is copied twice. Returns the
        header bucket's buffer (None: the lying buckets alone), the tensors (views, made while the
        data is on its way) and the receives."""
        weights, works, buffers = {}, [], []
        self._buffers_in.reclaim()
        for bucket in layout:
            buffers.append(self._buffers_in.take(getattr(torch, bucket["dtype"]), bucket["n"]))
            if options is None:
                works.append(group.broadcast(buffers[-1], 0))
            else:
                works.append(group.broadcast([buffers[-1]], options))
        for buffer, bucket in zip(buffers, layout, strict=True):
            weights.update(unpack(buffer, bucket))
        packed = [i for i, bucket in enumerate(layout) if not bucket["lies"]]
        return (buffers[packed[0]] if packed else None), weights, works

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
        """Leave the group: the publisher drops it (members go back to waiting for a generation)
        and stops its watcher; an engine asks the publisher's watcher to drop the group, which
        releases its receiver's pending receive, and stops."""
        self._stopping.set()
        try:
            store = connect(self.address, 5)
            if self.rank == 0:
                store.queue_push(EVENTS, self._token)  # wakes the watcher
            else:
                note_leave(store, self.generation)
        except RuntimeError:  # the store is gone: so is every wait on it, and the publisher
            pass
        if self.rank == 0:
            with self._lock:
                self._drop_group()
            self._watcher.join(timeout=5)
        elif self._receiver is not None:
            self._receiver.join(timeout=5)
