"""What every process of a run sets up the same way: quiet library logs and the weight-sync channel.

A leaf module (it imports only the schema): the driver (`estuary.train`) and the actors
(`learner.actor`, `rollout.actor`) both import it, so no actor imports the driver. The channel
is described here once (`sync_channel`) and opened in one place (`SyncChannel.open`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from configs.schema import Config


def quiet_libraries() -> None:
    """Progress bars of weight loading and saving say nothing a run's log needs (every process)."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@dataclass(frozen=True)
class SyncChannel:
    """Where a run's weight versions travel: a transport (`weights_sync.transport`) and its address."""

    kind: str
    address: str
    engines: int = 0
    """`collective`: the engines expected in the broadcast group (one per rollout worker)."""
    join_window_s: float = 5.0
    """`collective`: how long the publisher waits for engines when it re-forms the group."""
    bucket_bytes: int = 64 << 20
    """`collective`: most bytes per broadcast."""

    def open(self, rank: int = 0, device: str = "cpu"):
        """This process's end of the channel (a `weights_sync.protocol.WeightSync`): rank 0 publishes;
        with `collective`, engine k of the rollout workers is rank k + 1."""
        from weights_sync.protocol import make_weight_sync

        options = {}
        if self.kind == "collective":
            options = {"join_window_s": self.join_window_s, "bucket_bytes": self.bucket_bytes}
        return make_weight_sync(self.kind, self.address, rank=rank, world_size=1 + self.engines, device=device,
                                **options)


def sync_channel(cfg: Config, run_dir: Path, rendezvous: str = "") -> SyncChannel:
    """`local`: a folder under the run; `ray`: the run's name (its registry actor); `collective`: the
    `tcp://host:port` of the rendezvous store the driver hosts (`weights_sync.membership.host_rendezvous`)."""
    transport, ws = cfg.weights_sync.transport, cfg.weights_sync
    if transport == "collective":
        if not rendezvous:
            raise ValueError("the collective channel needs the rendezvous address the driver hosts")
        return SyncChannel(transport, rendezvous, cfg.rollout.num_workers, ws.join_window_s, ws.bucket_mb << 20)
    return SyncChannel(transport, str(Path(run_dir) / "weights") if transport == "local" else cfg.run.name)
