"""MoE routing capture and replay on transformers' NemotronH (training-side forward passes).

    with RouterTap(model, replay=experts) as tap:      # experts: per MoE layer (N, k), -1 = free
        logits = model(input_ids).logits
    tap.router_logits   # per MoE layer (N, E) float32, as the forward pass computed them
    tap.experts         # per MoE layer (N, k) expert ids actually used
    tap.balance_logits()  # per MoE layer (N, E), from detached inputs: for the load-balance loss

N counts every position of the batch (B*T, row-major). Replay (R3, "rollout routing replay")
makes the trainer's forward use the experts the engine chose, so training log-probs are those
of the network that produced the samples; the gate weights are still recomputed from the
trainer's router scores at those experts, so gradients reach the router when it is not frozen.
Only the trunk's routers (`model.model.layers`) are tapped, never the MTP head's.
"""

from __future__ import annotations

import torch
from torch import nn


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """The trunk's MoE routers in layer order (empty for dense and attention-only models)."""
    trunk = getattr(getattr(model, "model", model), "layers", [])
    routers = []
    for layer in trunk:
        gate = getattr(getattr(layer, "mixer", None), "gate", None)
        if gate is not None and hasattr(gate, "e_score_correction_bias"):
            routers.append(gate)
    return routers


def _replayed(gate: nn.Module, router_logits: torch.Tensor, chosen: torch.Tensor,
              forced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k weights and ids with rows of `forced` (N, k) (-1 rows: keep `chosen`)."""
    keep = (forced < 0).any(dim=1, keepdim=True)  # (N, 1)
    ids = torch.where(keep, chosen, forced.to(chosen.device, chosen.dtype))  # (N, k)
    weights = router_logits.sigmoid().gather(1, ids)  # (N, k)
    if gate.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * gate.routed_scaling_factor, ids


class RouterTap:
    """Records router logits and chosen experts; optionally replays given experts."""

    def __init__(self, model: nn.Module, replay: list[torch.Tensor] | None = None) -> None:
        self.routers = moe_routers(model)
        if replay is not None and len(replay) != len(self.routers):
            raise ValueError(f"routing replay has {len(replay)} layers; the policy has {len(self.routers)} MoE layers")
        self.replay = replay
        self.router_logits: list[torch.Tensor] = []
        self.experts: list[torch.Tensor] = []
        self._inputs: list[tuple[nn.Module, torch.Tensor]] = []  # (router, its detached input)
        self._handles: list = []

    def _hook(self, index: int):
        def hook(gate, inputs, output):
            router_logits, weights, ids = output
            if self.replay is not None:
                forced = self.replay[index]
                if forced.shape != ids.shape:
                    raise ValueError(f"routing replay for MoE layer {index} has shape {tuple(forced.shape)}; "
                                     f"the batch routes {tuple(ids.shape)}")
                weights, ids = _replayed(gate, router_logits, ids, forced)
            self.router_logits.append(router_logits)
            self.experts.append(ids)
            self._inputs.append((gate, inputs[0].detach()))
            return router_logits, weights, ids
        return hook

    def balance_logits(self) -> list[torch.Tensor]:
        """Per MoE layer (N, E): the router logits recomputed from the router's detached input.

        An auxiliary loss on these moves only the routers' own weights (nothing when they are
        frozen), never the trunk that produced their input. The router module is called again
        (its weight may be a ZeRO-3 shard outside its own forward), so call this after the
        `with` block, when the tap no longer records.
        """
        if self._handles:
            raise RuntimeError("call RouterTap.balance_logits() after its `with` block, not inside it")
        return [gate(x)[0] for gate, x in self._inputs]

    def __enter__(self) -> RouterTap:
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
