"""The weight-sync protocol: the learner publishes versions, engines pull the newest when ready.

    sync = make_weight_sync("local", channel="runs/x/weights")
    sync.publish(model.state_dict(), version=7)          # learner, after a step
    update = sync.pull(newer_than=engine.version)         # engine, between generations
    if update: engine.update_weights(update.weights, update.version)

Versions are monotone; `pull` returns only a complete update newer than the caller's, or None.
The learner never waits for an engine and an engine never blocks the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Update:
    version: int
    weights: dict[str, torch.Tensor]


class WeightSync(Protocol):
    def publish(self, weights: dict[str, torch.Tensor], version: int) -> None: ...

    def latest_version(self) -> int: ...

    def pull(self, newer_than: int) -> Update | None: ...

    def close(self) -> None: ...


def make_weight_sync(kind: str, channel: str, rank: int = 0, world_size: int = 1, device: str = "cpu",
                     **options) -> WeightSync:
    """A transport by config string (`weights_sync.transport`).

    - `local`: shared memory on one machine; `channel` is a folder both sides can see.
    - `ray`: Ray's object store, any node of the cluster; `channel` names the run.
    - `collective`: torch.distributed broadcast (gloo on CPU, NCCL on GPU); `channel` is the
      rendezvous `tcp://host:port` (`weights_sync.membership.host_rendezvous`), rank 0 publishes
      and ranks 1..world_size-1 are engines; `options` (bucket_bytes, join_window_s) go to it.
    """
    if kind == "local":
        from weights_sync.local import SharedMemoryWeightSync

        return SharedMemoryWeightSync(channel)
    if kind == "ray":
        from weights_sync.ray_store import RayObjectStoreWeightSync

        return RayObjectStoreWeightSync(channel)
    if kind == "collective":
        from weights_sync.collective import CollectiveWeightSync

        return CollectiveWeightSync(channel, rank=rank, world_size=world_size, device=device, **options)
    raise ValueError(f"unknown weight-sync transport {kind!r}; choose local, ray or collective")
