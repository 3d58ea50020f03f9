"""Same-machine weight sync through POSIX shared memory, one copy on each side.

The publisher keeps a ring of `RING` shared-memory segments laid out for its state dict (every
tensor back to back after a 16-byte header; the layout goes to `<channel>/layout-<tag>.json`
once per ring). A publication writes into the next segment, then points a small control
segment (named after the channel) at it: version, ring tag and slot. Both the control block and
each segment's header are seqlocks (`seq` odd while being written): a reader copies straight into
its own tensors and re-checks the header, so an update overwritten or torn while being read is
retried, never served. Copies are single batched calls over all tensors (`_foreach_copy_`), and
segments are reused across publications (no fresh pages to fault in). A publisher that restarts
on the same channel (a resumed learner) attaches to the existing control block, so engines keep
following it. `close` unlinks the ring and the control block.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import torch

from weights_sync.protocol import Update

RING = 3
HEADER = 16  # int64 seq, int64 version


def _untracked(segment: shared_memory.SharedMemory) -> shared_memory.SharedMemory:
    # Python's resource tracker would unlink segments when *this* process exits, even ones that
    # other processes still read; their lifetime is managed here instead.
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(segment._name, "shared_memory")  # noqa: SLF001
    except Exception:  # noqa: BLE001 - best effort: absent tracker means nothing to undo
        pass
    return segment


def _unlink(segment: shared_memory.SharedMemory) -> None:
    _unlink_name(segment._name)  # noqa: SLF001


def _unlink_name(name: str) -> bool:
    """Unlink a segment by its `/name`; whether it existed. (SharedMemory.unlink() would also tell
    the resource tracker, which no longer tracks it.)"""
    try:
        shared_memory._posixshmem.shm_unlink(name)  # noqa: SLF001
        return True
    except FileNotFoundError:
        return False


def _layout(weights: dict[str, torch.Tensor]) -> tuple[list[dict], int]:
    items, offset = [], HEADER
    for name, t in weights.items():
        size = t.numel() * t.element_size()
        items.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                      "offset": offset, "size": size})
        offset += (size + 63) // 64 * 64  # cache-line aligned
    return items, offset


def _views(segment: shared_memory.SharedMemory, layout: list[dict]) -> list[torch.Tensor]:
    """Typed tensors over a segment's bytes, one per layout item (no copy)."""
    raw = torch.frombuffer(segment.buf, dtype=torch.uint8)
    return [raw[it["offset"]: it["offset"] + it["size"]].view(getattr(torch, it["dtype"])).view(it["shape"])
            for it in layout]


class _SeqLock:
    """int64 words in shared memory: [seq, payload...]; seq is odd while a writer is inside."""

    def __init__(self, buf, words: int) -> None:
        self.words = np.ndarray((words,), dtype=np.int64, buffer=buf)

    def write(self, *values: int) -> None:
        self.words[0] += 1
        self.words[1: 1 + len(values)] = values
        self.words[0] += 1

    def read(self, n: int, attempts: int = 100) -> tuple[int, ...] | None:
        for _ in range(attempts):
            seq = int(self.words[0])
            values = tuple(int(v) for v in self.words[1: 1 + n])
            if seq % 2 == 0 and int(self.words[0]) == seq:
                return values
        return None


def _control_name(channel: Path) -> str:
    return f"estuary-wc-{hashlib.sha1(str(channel.resolve()).encode()).hexdigest()[:20]}"


def remove_channel(channel: str | os.PathLike) -> int:
    """Unlink every shared-memory segment a channel's publishers left (its control block and each
    ring named by a layout file in the folder); returns how many were removed.

    A learner actor is killed with its run, not closed, so its segments outlive it. The driver
    calls this before a run, so that a new run in the same folder never reads the last run's
    version (its learner would take the engines for up to date and never publish: every group
    then goes stale), and after it, so /dev/shm does not fill up run by run."""
    channel = Path(channel)
    names = [_control_name(channel)]
    for layout in channel.glob("layout-*.json"):
        tag = layout.name.removeprefix("layout-").removesuffix(".json")
        names += [f"estuary-w-{tag}-{i}" for i in range(RING)]
        layout.unlink(missing_ok=True)
    return sum(_unlink_name(f"/{name}") for name in names)


class SharedMemoryWeightSync:
    def __init__(self, channel: str | os.PathLike) -> None:
        self.channel = Path(channel)
        self.channel.mkdir(parents=True, exist_ok=True)
        self._control_name = _control_name(self.channel)
        self._control: shared_memory.SharedMemory | None = None
        self._owner = False  # this side created (and will unlink) the control block
        self._ring: list[shared_memory.SharedMemory] = []
        self._ring_views: list[list[torch.Tensor]] = []
        self._layout: list[dict] | None = None
        self._signature: list[tuple] = []
        self._tag = 0
        self._next = 0
        self._open: dict[str, tuple[shared_memory.SharedMemory, list[dict], list[torch.Tensor]]] = {}
        self._layouts: dict[int, list[dict]] = {}

    # -- control block ---------------------------------------------------------------------------
    def _control_lock(self, create: bool) -> _SeqLock | None:
        if self._control is None:
            try:
                self._control = _untracked(shared_memory.SharedMemory(name=self._control_name))
            except FileNotFoundError:
                if not create:
                    return None
                self._control = _untracked(shared_memory.SharedMemory(name=self._control_name, create=True, size=64))
                self._owner = True
        return _SeqLock(self._control.buf, 4)

    def _pointer(self) -> tuple[int, int, int] | None:
        """(version, ring tag, slot) of the newest publication, or None."""
        lock = self._control_lock(create=False)
        got = None if lock is None else lock.read(3)
        return None if got is None or got[1] == 0 else got

    def latest_version(self) -> int:
        pointer = self._pointer()
        return -1 if pointer is None else pointer[0]

    # -- publisher ----------------------------------------------------------------------------
    def _ensure_ring(self, weights: dict[str, torch.Tensor]) -> None:
        signature = [(name, t.shape, t.dtype) for name, t in weights.items()]
        if self._ring and signature == self._signature:
            return
        layout, size = _layout(weights)
        self._signature = signature
        self._unlink_ring()
        tag = int(uuid.uuid4().hex[:12], 16) or 1
        self._ring = [_untracked(shared_memory.SharedMemory(name=f"estuary-w-{tag:012x}-{i}", create=True, size=size))
                      for i in range(RING)]
        self._ring_views = [_views(segment, layout) for segment in self._ring]
        tmp = self.channel / f"layout-{tag:012x}.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(layout))
        os.replace(tmp, self.channel / f"layout-{tag:012x}.json")
        self._layout, self._tag, self._next = layout, tag, 0

    def publish(self, weights: dict[str, torch.Tensor], version: int) -> None:
        lock = self._control_lock(create=True)
        latest = self.latest_version()
        if version <= latest:
            raise ValueError(f"version {version} is not newer than the published {latest}")
        self._ensure_ring(weights)
        slot = self._next
        self._next = (self._next + 1) % RING
        header = _SeqLock(self._ring[slot].buf, 2)
        header.words[0] += 1  # odd: being written
        with torch.no_grad():
            torch._foreach_copy_(self._ring_views[slot], list(weights.values()))
        header.words[1] = version
        header.words[0] += 1  # even: complete
        self._point_at(lock, version, slot)

    def _point_at(self, lock: _SeqLock, version: int, slot: int) -> None:
        lock.write(version, self._tag, slot)

    # -- readers ------------------------------------------------------------------------------
    def _segment(self, tag: int, slot: int):
        name = f"estuary-w-{tag:012x}-{slot}"
        if name not in self._open:
            if tag not in self._layouts:
                try:
                    self._layouts = {tag: json.loads((self.channel / f"layout-{tag:012x}.json").read_text())}
                except FileNotFoundError:
                    return None
                self._close_readers()  # a new ring: the old one's mappings are of no more use
            try:
                segment = _untracked(shared_memory.SharedMemory(name=name))
            except FileNotFoundError:
                return None
            self._open[name] = (segment, self._layouts[tag], _views(segment, self._layouts[tag]))
        return self._open[name]

    def pull_into(self, targets: dict[str, torch.Tensor], newer_than: int, attempts: int = 5) -> int | None:
        """Copy the newest complete version into `targets` (name -> tensor); returns it, or None."""
        for _ in range(attempts):
            pointer = self._pointer()
            if pointer is None or pointer[0] <= newer_than:
                return None
            version, tag, slot = pointer
            opened = self._segment(tag, slot)
            if opened is None:
                continue  # the ring was replaced meanwhile; the pointer says where now
            segment, layout, views = opened
            header = _SeqLock(segment.buf, 2)
            seq = int(header.words[0])
            if seq % 2 or int(header.words[1]) != version:
                continue  # being rewritten with a newer version
            with torch.no_grad():
                torch._foreach_copy_([targets[item["name"]] for item in layout], views)
            if int(header.words[0]) == seq:  # nobody wrote while we copied: a consistent version
                return version
        return None

    def pull(self, newer_than: int) -> Update | None:
        """The newest complete version as fresh tensors (for callers without their own)."""
        pointer = self._pointer()
        if pointer is None or pointer[0] <= newer_than or self._segment(pointer[1], pointer[2]) is None:
            return None
        layout = self._layouts[pointer[1]]
        targets = {item["name"]: torch.empty(item["shape"], dtype=getattr(torch, item["dtype"])) for item in layout}
        version = self.pull_into(targets, newer_than)
        return None if version is None else Update(version=version, weights=targets)

    def _unlink_ring(self) -> None:
        self._ring_views = []
        for segment in self._ring:
            _unlink(segment)
            try:
                segment.close()
            except BufferError:
                pass
        if self._ring:
            (self.channel / f"layout-{self._tag:012x}.json").unlink(missing_ok=True)
        self._ring = []

    def _close_readers(self) -> None:
        segments = [segment for segment, _, _ in self._open.values()]
        self._open.clear()  # drops the views first: a mapping with live views cannot be closed
        for segment in segments:
            try:
                segment.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes with the process
                pass
        self._open.clear()

    def close(self) -> None:
        """Unlink the publisher's ring and control block; drop the reader's mappings."""
        self._unlink_ring()
        self._close_readers()
        if self._control is not None:
            if self._owner or self._tag:
                _unlink(self._control)
            try:
                self._control.close()
            except BufferError:
                pass
            self._control = None
