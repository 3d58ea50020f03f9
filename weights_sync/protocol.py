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


def make_weight_sync(kind: str, channel: str) -> WeightSync:
    """A transport by config string (`weights_sync.transport`)."""
    if kind == "local":
        from weights_sync.local import SharedMemoryWeightSync

        return SharedMemoryWeightSync(channel)
    raise ValueError(f"unknown weight-sync transport {kind!r}; available: local")
