"""Weight sync by torch.distributed broadcast: gloo on CPU, NCCL on GPU, any number of machines.

    # learner (rank 0 of the sync group; it also hosts the rendezvous store)
    sync = CollectiveWeightSync("tcp://10.0.0.1:29600", rank=0, world_size=1 + n_engines)
    sync.publish(state_dict, version)              # returns once every engine has received it
    # each engine, rank 1..n
    sync = CollectiveWeightSync("tcp://10.0.0.1:29600", rank=k, world_size=1 + n_engines)
    update = sync.pull(newer_than=engine.version)   # never blocks: the newest complete version

The sync group is a process group of its own (built on a TCPStore, not `init_process_group`),
so it lives beside the learners' DeepSpeed group and the engines' own. The publisher sends a
header (version, layout id) and then the tensors in buckets of at most `bucket_bytes` (one dtype
each; a bigger tensor travels alone), packed into one reusable buffer per dtype: no side ever
allocates a whole-model flat buffer. The layout (buckets, names, shapes, offsets) goes through the
store once per new layout. On each engine a receiver thread waits in the broadcast at all times,
unpacks each bucket into the new version's own tensors and only then swaps the version in under
a lock: the learner never waits for an engine busy generating, and a partially received update
is never served. Versions only go up.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from weights_sync.protocol import Update

_STOP = -2  # header version that tells receivers to leave


def _group(address: str, rank: int, world_size: int, device: torch.device, timeout_s: float):
    url = urlparse(address)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"collective weight sync needs an address like tcp://host:port; got {address!r}")
    store = dist.TCPStore(url.hostname, url.port, world_size, is_master=rank == 0,
                          timeout=timedelta(seconds=timeout_s))
    if device.type == "cuda":
        return store, dist.ProcessGroupNCCL(store, rank, world_size)
    return store, dist.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=timeout_s))


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


def _buffers(layout: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    """One reusable buffer per dtype, as big as that dtype's largest bucket."""
    sizes: dict[str, int] = {}
    for b in layout:
        sizes[b["dtype"]] = max(sizes.get(b["dtype"], 0), b["n"])
    return {k: torch.empty(n, dtype=getattr(torch, k), device=device) for k, n in sizes.items()}


class CollectiveWeightSync:
    def __init__(self, address: str, rank: int, world_size: int, device: str = "cpu",
                 timeout_s: float = 300.0, bucket_bytes: int = 64 << 20) -> None:
        self.rank, self.world_size, self.bucket_bytes = rank, world_size, bucket_bytes
        self.device = torch.device(device)
        self.store, self.group = _group(address, rank, world_size, self.device, timeout_s)
        self._layout_id = 0
        self._layout: list | None = None
        self._buffers: dict[str, torch.Tensor] = {}  # the publisher's reusable bucket buffers
        self._recv_layout: list | None = None
        self._recv_buffers: dict[str, torch.Tensor] = {}  # an engine's
        self._lock = threading.Lock()
        self._latest: Update | None = None
        self._published = -1
        self._receiver = None
        if rank != 0:
            self._receiver = threading.Thread(target=self._receive_loop, name="weights-receiver", daemon=True)
            self._receiver.start()

    # -- publisher (rank 0) ---------------------------------------------------------------------
    def publish(self, weights: dict[str, torch.Tensor], version: int) -> None:
        if self.rank != 0:
            raise RuntimeError("only rank 0 of the sync group publishes")
        if version <= self._published:
            raise ValueError(f"version {version} is not newer than the published {self._published}")
        layout = bucket_layout(weights, self.bucket_bytes)
        if layout != self._layout:
            self._layout_id += 1
            self._layout = layout
            self.store.set(f"layout-{self._layout_id}", json.dumps(layout))
            self._buffers = _buffers(layout, self.device)
        self._broadcast_header(version)
        with torch.no_grad():
            for bucket in layout:
                buffer = self._buffers[bucket["dtype"]][: bucket["n"]]
                for name, _, start, n in bucket["tensors"]:
                    buffer[start: start + n].copy_(weights[name].reshape(-1))
                self.group.broadcast(buffer, 0).wait()
        self._published = version

    def _broadcast_header(self, version: int) -> None:
        header = torch.tensor([version, self._layout_id], dtype=torch.int64, device=self.device)
        self.group.broadcast(header, 0).wait()

    def latest_version(self) -> int:
        if self.rank == 0:
            return self._published
        with self._lock:
            return -1 if self._latest is None else self._latest.version

    # -- engines (rank > 0) ---------------------------------------------------------------------
    def _receive_loop(self) -> None:
        layouts: dict[int, dict] = {}
        while True:
            header = torch.empty(2, dtype=torch.int64, device=self.device)
            self.group.broadcast(header, 0).wait()
            version, layout_id = (int(x) for x in header.tolist())
            if version == _STOP:
                return
            if layout_id not in layouts:
                layouts[layout_id] = json.loads(self.store.get(f"layout-{layout_id}"))
            weights = self._receive(layouts[layout_id])
            with self._lock:  # swapped in only once complete
                self._latest = Update(version=version, weights=weights)

    def _receive(self, layout: list[dict]) -> dict[str, torch.Tensor]:
        """One version, bucket by bucket, into tensors of its own (the served version is untouched)."""
        if self._recv_layout is not layout:
            self._recv_layout, self._recv_buffers = layout, _buffers(layout, self.device)
        weights = {}
        for bucket in layout:
            buffer = self._recv_buffers[bucket["dtype"]][: bucket["n"]]
            self.group.broadcast(buffer, 0).wait()
            for name, shape, start, n in bucket["tensors"]:
                weights[name] = buffer[start: start + n].clone().view(shape)
        return weights

    def pull(self, newer_than: int) -> Update | None:
        with self._lock:
            latest = self._latest
        return latest if latest is not None and latest.version > newer_than else None

    def close(self) -> None:
        """The publisher tells the receivers to stop; everyone leaves the group."""
        if self.rank == 0 and self.world_size > 1:
            try:
                self._broadcast_header(_STOP)
            except RuntimeError:  # engines that already left: nobody to tell
                pass
        if self._receiver is not None:
            self._receiver.join(timeout=30)
