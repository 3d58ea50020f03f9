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

    def open(self, rank: int = 0, world_size: int = 1, device: str = "cpu"):
        """This process's end of the channel (a `weights_sync.protocol.WeightSync`)."""
        from weights_sync.protocol import make_weight_sync

        return make_weight_sync(self.kind, self.address, rank=rank, world_size=world_size, device=device)


def sync_channel(cfg: Config, run_dir: Path) -> SyncChannel:
    """`local`: a folder under the run; `ray`: the run's name (its registry actor)."""
    transport = cfg.weights_sync.transport
    return SyncChannel(transport, str(Path(run_dir) / "weights") if transport == "local" else cfg.run.name)
