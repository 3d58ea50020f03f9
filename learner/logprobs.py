"""Log-probs of sampled tokens under the sampler's processing, whole or in chunks of positions.

    logp, entropy = logprobs_from_logits(logits, ids, temperature, top_p, top_k)     # (B, T) each
    logp, entropy = chunked_logprobs(model.lm_head, hidden, ids, 4096, temperature)  # the same values

Full-vocabulary logits are the learner's largest activation at long context: one 49k-token
sequence of a 131k vocabulary holds 60 GiB of logits, their fp32 copy and the log-softmax.
`chunked_logprobs` runs the output head on `chunk` positions at a time and recomputes each chunk
in backward (activation checkpointing), so at most one chunk's logits exist at once, forward or
backward; what it keeps per position is the final hidden state (D values, not V).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from rollout.sampling import processed_logprobs


def token_logprobs(scores: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                   top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (N, V), targets (N,) -> (log-prob of each target, entropy (no gradient)), (N,) each.

    Under the sampler's processing (`rollout.sampling.processed_logprobs`): temperature, then
    top-k and top-p; a token outside the kept set gets -inf.
    """
    if temperature == 1.0 and top_p >= 1.0 and top_k <= 0:
        logp_all = torch.log_softmax(scores.float(), dim=-1)
    else:
        n, dev = scores.shape[0], scores.device  # one row per position, each with the sampler's settings
        logp_all = processed_logprobs(scores, torch.full((n,), temperature, device=dev),
                                      torch.full((n,), top_k, device=dev), torch.full((n,), top_p, device=dev))
    logp = logp_all.gather(1, targets[:, None])[:, 0]
    with torch.no_grad():
        p = logp_all.exp()
        entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)  # truncated tokens add 0, not 0 * -inf
    return logp, entropy


def _with_position_zero(logp: torch.Tensor, entropy: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B*(T-1),) each -> (B, T) each, position 0 (no prefix) set to 0."""
    logp, entropy = logp.view(b, -1), entropy.view(b, -1)
    zero = torch.zeros_like(logp[:, :1])
    return torch.cat([zero, logp], dim=1), torch.cat([zero, entropy], dim=1)


def logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0,
                         top_p: float = 1.0, top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), ids (B, T) -> (log-prob of each token given its prefix, entropy), both (B, T).

    Position 0 has no prefix: 0.
    """
    b, t, v = logits.shape
    scores = logits[:, :-1].reshape(b * (t - 1), v)  # predicts tokens 1..T-1
    return _with_position_zero(*token_logprobs(scores, input_ids[:, 1:].reshape(-1), temperature, top_p, top_k), b)


def chunked_logprobs(head: torch.nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, chunk: int,
                     temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (B, T, D) final states, ids (B, T) -> `logprobs_from_logits(head(hidden), ids, ...)`,
    computing `head` on at most `chunk` positions at once (and again in backward, per chunk)."""
    b, t, d = hidden.shape
    states = hidden[:, :-1].reshape(b * (t - 1), d)  # (N, D), N = B*(T-1)
    targets = input_ids[:, 1:].reshape(-1)  # (N,)

    def piece(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return token_logprobs(head(h).float(), y, temperature, top_p, top_k)

    recompute = torch.is_grad_enabled() and hidden.requires_grad
    parts = [checkpoint(piece, states[i:i + chunk], targets[i:i + chunk], use_reentrant=False) if recompute
             else piece(states[i:i + chunk], targets[i:i + chunk]) for i in range(0, states.shape[0], chunk)]
    logp = torch.cat([p[0] for p in parts]) if parts else states.new_zeros(0)
    entropy = torch.cat([p[1] for p in parts]) if parts else states.new_zeros(0)
    return _with_position_zero(logp, entropy, b)
