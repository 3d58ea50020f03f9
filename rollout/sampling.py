"""Token sampling with exact behaviour log-probs: temperature, top-k and top-p, per row.

Pure tensor functions (no engine state). `processed_logprobs` gives the log-distribution a token
is actually drawn from; `sample` draws from it and returns each token's log-prob under it.
"""

from __future__ import annotations

import torch


def processed_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor) -> torch.Tensor:
    """logits (B, V), temperature (B,), top_k (B,) int (0: off), top_p (B,) -> log-probs (B, V).

    Tokens removed by top-k/top-p get -inf. Top-p keeps the smallest prefix of the sorted
    distribution whose mass reaches p (the token that crosses p is kept).
    """
    scaled = logits.float() / temperature[:, None]
    if not bool((top_k > 0).any()) and bool((top_p >= 1.0).all()):
        return torch.log_softmax(scaled, dim=-1)  # nothing truncated: skip the sort
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(scaled.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, scaled.shape[-1]))
    drop = rank >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) mass of strictly higher-ranked tokens
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    kept = torch.empty_like(scaled).scatter_(1, order, sorted_logits)
    return torch.log_softmax(kept, dim=-1)


def processed_for(logits: torch.Tensor, params: list) -> torch.Tensor:
    """`processed_logprobs` with one SamplingParams per row: logits (B, V) or (B, T, V).

    When no row scales or truncates (temperature 1, no top-k, top-p 1: the RL default) this is a
    log-softmax, without building the per-row setting tensors every decoding step.
    """
    if all(p.temperature == 1.0 and p.top_k <= 0 and p.top_p >= 1.0 for p in params):
        return torch.log_softmax(logits.float(), dim=-1)
    dev, t = logits.device, logits.shape[1] if logits.dim() == 3 else 1
    temp = torch.tensor([p.temperature for p in params], device=dev).repeat_interleave(t)
    top_k = torch.tensor([p.top_k for p in params], device=dev).repeat_interleave(t)
    top_p = torch.tensor([p.top_p for p in params], device=dev).repeat_interleave(t)
    return processed_logprobs(logits.reshape(-1, logits.shape[-1]), temp, top_k, top_p).view(logits.shape)


def sample(logprobs: torch.Tensor, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """logprobs (B, V) -> (tokens (B,), their log-probs (B,)).

    Inverse-CDF sampling (one uniform per row, a cumulative sum and a binary search): the same
    distribution as torch.multinomial at a fraction of its cost on CPU.
    """
    cdf = logprobs.exp().cumsum(dim=-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.shape[1] - 1)
    # A token with probability 0 has a flat cdf step and is never the first index above u.
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]
