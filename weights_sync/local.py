"""Same-machine weight sync through POSIX shared memory, one copy on each side.

The publisher keeps a ring of `RING` shared-memory segments laid out for its state dict (every
tensor back to back after a 16-byte header). A publication writes into the next segment, then
atomically replaces `<channel>/LATEST` (os.replace) with the version, the segment and the
layout. Each segment's header is a seqlock (`seq`, odd while being written; `version`): a reader
copies straight into its own tensors and re-checks the header, so an update overwritten or torn
while being read is retried, never served. Segments are reused across publications (no fresh
pages to fault in), readers keep their mappings open, and `close` unlinks the ring.
"""

from __future__ import annotations

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


def _layout(weights: dict[str, torch.Tensor]) -> tuple[list[dict], int]:
    items, offset = [], HEADER
    for name, t in weights.items():
        size = t.numel() * t.element_size()
        items.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                      "offset": offset, "size": size})
        offset += (size + 63) // 64 * 64  # cache-line aligned
    return items, offset


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class SharedMemoryWeightSync:
    def __init__(self, channel: str | os.PathLike) -> None:
        self.channel = Path(channel)
        self.channel.mkdir(parents=True, exist_ok=True)
        self._ring: list[shared_memory.SharedMemory] = []
        self._layout: list[dict] | None = None
        self._next = 0
        self._open: dict[str, shared_memory.SharedMemory] = {}  # reader-side mappings

    # -- publisher ----------------------------------------------------------------------------
    def latest_version(self) -> int:
        latest = self._latest()
        return -1 if latest is None else int(latest["version"])

    def _latest(self) -> dict | None:
        try:
            return json.loads((self.channel / "LATEST").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _ensure_ring(self, weights: dict[str, torch.Tensor]) -> None:
        layout, size = _layout(weights)
        if self._layout == layout and self._ring:
            return
        self._unlink_ring()
        tag = uuid.uuid4().hex[:12]
        self._ring = [_untracked(shared_memory.SharedMemory(name=f"estuary-w-{tag}-{i}", create=True, size=size))
                      for i in range(RING)]
        self._layout, self._next = layout, 0

    def publish(self, weights: dict[str, torch.Tensor], version: int) -> None:
        if version <= self.latest_version():
            raise ValueError(f"version {version} is not newer than the published {self.latest_version()}")
        self._ensure_ring(weights)
        segment = self._ring[self._next]
        self._next = (self._next + 1) % RING
        header = np.ndarray((2,), dtype=np.int64, buffer=segment.buf)
        header[0] += 1  # odd: being written
        dest = torch.frombuffer(segment.buf, dtype=torch.uint8)
        for item, t in zip(self._layout, weights.values(), strict=True):
            if item["size"]:
                dest[item["offset"]: item["offset"] + item["size"]].copy_(_bytes_of(t.to("cpu")))
        header[1] = version
        header[0] += 1  # even: complete
        del header, dest
        tmp = self.channel / f"LATEST.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"version": version, "segment": segment.name, "tensors": self._layout}))
        os.replace(tmp, self.channel / "LATEST")

    # -- readers ------------------------------------------------------------------------------
    def _segment(self, name: str) -> shared_memory.SharedMemory | None:
        if name not in self._open:
            try:
                self._open[name] = _untracked(shared_memory.SharedMemory(name=name))
            except FileNotFoundError:
                return None
        return self._open[name]

    def pull_into(self, targets: dict[str, torch.Tensor], newer_than: int, attempts: int = 5) -> int | None:
        """Copy the newest complete version into `targets` (name -> tensor); returns it, or None."""
        for _ in range(attempts):
            latest = self._latest()
            if latest is None or int(latest["version"]) <= newer_than:
                return None
            segment = self._segment(latest["segment"])
            if segment is None:
                continue  # the ring was replaced meanwhile; LATEST points elsewhere now
            header = np.ndarray((2,), dtype=np.int64, buffer=segment.buf)
            seq = int(header[0])
            if seq % 2 or int(header[1]) != int(latest["version"]):
                continue  # being rewritten with a newer version
            source = torch.frombuffer(segment.buf, dtype=torch.uint8)
            with torch.no_grad():
                for item in latest["tensors"]:
                    if item["size"]:
                        raw = source[item["offset"]: item["offset"] + item["size"]]
                        dst = targets[item["name"]]
                        dst.copy_(raw.view(getattr(torch, item["dtype"])).view(item["shape"]))
            if int(header[0]) == seq:  # nobody wrote while we copied: a consistent version
                return int(latest["version"])
        return None

    def pull(self, newer_than: int) -> Update | None:
        """The newest complete version as fresh tensors (for callers without their own)."""
        latest = self._latest()
        if latest is None or int(latest["version"]) <= newer_than:
            return None
        targets = {item["name"]: torch.empty(item["shape"], dtype=getattr(torch, item["dtype"]))
                   for item in latest["tensors"]}
        version = self.pull_into(targets, newer_than)
        return None if version is None else Update(version=version, weights=targets)

    def _unlink_ring(self) -> None:
        for segment in self._ring:
            try:
                segment.close()
                segment.unlink()
            except (FileNotFoundError, BufferError):
                pass
        self._ring = []

    def close(self) -> None:
        """Unlink the publisher's ring and drop the reader's mappings."""
        self._unlink_ring()
        for segment in self._open.values():
            try:
                segment.close()
            except BufferError:
                pass
        self._open.clear()
