"""One GRPO optimizer step over micro-batches, with gradient accumulation (plain torch).

The loss of each micro-batch is weighted by its share of the step's trained tokens, so
accumulating micro-batches gives the same gradient as one big batch under token aggregation.
"""

from __future__ import annotations

import torch

from learner.batching import MicroBatch, token_logprobs
from learner.losses import LossConfig, policy_loss


def grpo_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[MicroBatch],
              cfg: LossConfig, max_grad_norm: float = 1.0) -> dict[str, float]:
    """Forward/backward every micro-batch, clip, step; returns averaged statistics."""
    model.train()
    total = sum(b.n_tokens for b in batches)
    if total == 0:
        return {"loss": 0.0, "trained_tokens": 0}
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    for batch in batches:
        logp = token_logprobs(model, batch.input_ids)
        loss, stats = policy_loss(logp, batch.behav_logp, batch.advantages, batch.loss_mask, cfg)
        share = batch.n_tokens / total
        (loss * share).backward()
        for key, value in {"loss": loss.item(), **stats}.items():
            sums[key] = sums.get(key, 0.0) + value * share
    params = [p for p in model.parameters() if p.requires_grad]
    sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf")))
    optimizer.step()
    model.eval()
    sums["trained_tokens"] = total
    return sums
