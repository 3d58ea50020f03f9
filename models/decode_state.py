"""Per-slot generation state shared by the fast decoders: named tensors indexed by slot, lengths.

A slot holds one sequence's recurrent state (Mamba conv window and SSM state) and KV cache.
Slots are reused: `reset` clears one for a new sequence, `copy` forks a prefilled prompt into the
slots of its G samples, `snapshot`/`restore` save and roll back the recurrent part (the KV cache
rolls back by length alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class ContextOverflow(ValueError):
    """A sequence would outgrow the slot's `max_len`."""


@dataclass
class DecodeState:
    slots: int
    max_len: int
    device: torch.device
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    lengths: torch.Tensor = None  # (slots,) tokens held per slot

    def __post_init__(self) -> None:
        if self.lengths is None:
            self.lengths = torch.zeros(self.slots, dtype=torch.long, device=self.device)

    def check_room(self, slot: int, extra: int) -> None:
        if int(self.lengths[slot]) + extra > self.max_len:
            raise ContextOverflow(
                f"slot {slot} would hold {int(self.lengths[slot]) + extra} tokens; max_len is {self.max_len}")

    def check_room_many(self, slots: torch.Tensor) -> None:
        if bool((self.lengths[slots] + 1 > self.max_len).any()):
            raise ContextOverflow(f"a sequence would exceed max_len={self.max_len}")

    def reset(self, slot: int) -> None:
        """Clear a slot for a new sequence (recurrent state to zero; KV is overwritten by length)."""
        for name, t in self.tensors.items():
            if name.endswith((".conv", ".ssm")):
                t[slot].zero_()
        self.lengths[slot] = 0

    def copy(self, src: int, dsts: list[int]) -> None:
        """Fork slot `src` into `dsts` (a prompt prefilled once for its G samples)."""
        if not dsts:
            return
        n = int(self.lengths[src])
        index = torch.tensor(dsts, dtype=torch.long, device=self.device)
        for name, t in self.tensors.items():
            if name.endswith((".k", ".v")):
                t[index, :n] = t[src, :n].clone()
            else:
                t[index] = t[src].clone()
        self.lengths[index] = n

    def snapshot(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """The recurrent state of `slots` (clones), to restore after rejected drafts."""
        return {name: t[slots].clone() for name, t in self.tensors.items()
                if name.endswith((".conv", ".ssm"))} | {"lengths": self.lengths[slots].clone()}

    def restore(self, slots: torch.Tensor, saved: dict[str, torch.Tensor]) -> None:
        for name, value in saved.items():
            if name == "lengths":
                self.lengths[slots] = value
            else:
                self.tensors[name][slots] = value
