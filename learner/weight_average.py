"""An exponential moving average of the trained weights (Polyak averaging) for the final policy.

    average = WeightAverage(model, decay=0.98)   # on rank 0; starts at the current weights
    average.update(model)                        # after every optimizer step
    final = average.applied(model.state_dict())  # the averaged weights in a whole state dict

The live weights keep training and keep feeding the rollout engines (sampling stays on-policy);
only the run's end takes the average: its evaluation and `final_policy/`. Why: the end of a time
budget stops the policy wherever its last few noisy steps took it (on the quick start, runs of one
config ended 6 points of mean reward apart), and an average over the last tens of steps is a
steadier point on the same path. The decay warms up as TensorFlow's `ExponentialMovingAverage`
does with `num_updates`, min(decay, (1 + t) / (10 + t)), so the starting weights are forgotten
within the first steps rather than over 1 / (1 - decay) of them.
"""

from __future__ import annotations

import torch


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"weight average decay {decay!r} must be in (0, 1)")
        self.decay = decay
        # A tied weight (an embedding that is also the output head) is one parameter under several
        # state-dict names: each alias maps to the name the average keeps it under.
        first: dict[int, str] = {}
        self.aliases = {name: first.setdefault(id(p), name)
                        for name, p in model.named_parameters(remove_duplicate=False)}
        self.restart(model)

    def restart(self, model: torch.nn.Module) -> None:
        """Start over from the model's current weights (a resumed run whose checkpoint has none)."""
        self.updates = 0
        # Trainable weights only: frozen ones (the routers under `freeze_router`) never move.
        self.shadow = {name: p.detach().float().cpu().clone()
                       for name, p in model.named_parameters() if p.requires_grad}

    def rate(self) -> float:
        """The decay of the next update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * weights, d = `rate()`."""
        keep = self.rate()
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float().cpu(), 1.0 - keep)
        self.updates += 1

    def applied(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` with its averaged weights replaced by the average (in each tensor's dtype)."""
        out = {}
        for key, value in state.items():
            name = self.aliases.get(key, key)
            out[key] = self.shadow[name].to(value.dtype) if name in self.shadow else value
        return out

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state["shadow"]) ^ set(self.shadow)
        if unknown:
            raise ValueError(f"the saved weight average does not match the model: {sorted(unknown)[:3]}")
        self.updates, self.shadow = state["updates"], state["shadow"]
