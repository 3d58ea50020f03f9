"""Exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023), as pure tensor maths.

Given K draft tokens sampled from the draft distributions q and the target distributions p at
the K+1 positions (the last one after all drafts), accept draft i with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection sample a replacement from
norm(max(0, p_i - q_i)); if all K are accepted, sample a bonus token from p_{K+1}. The emitted
tokens are distributed exactly as sampling from p one token at a time, and their behaviour
log-probs are taken from p (never from q).
"""

from __future__ import annotations

import torch


def speculative_accept(
    target_logprobs: torch.Tensor,
    draft_logprobs: torch.Tensor,
    draft_tokens: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Verify drafts for a batch.

    target_logprobs: (B, K+1, V) log p at each draft position and the bonus position
    draft_logprobs:  (B, K, V)   log q the drafts were sampled from
    draft_tokens:    (B, K)      the drafted tokens
    returns: accepted (B,) number of drafts kept (0..K);
             tokens (B, K+1) emitted tokens, valid up to index accepted (inclusive);
             token_logprobs (B, K+1) log p of each emitted token.
    """
    b, k1, _ = target_logprobs.shape
    k = k1 - 1
    p, q = target_logprobs.exp(), draft_logprobs.exp()
    p_draft = p[:, :k].gather(2, draft_tokens[..., None])[..., 0]  # (B, K)
    q_draft = q.gather(2, draft_tokens[..., None])[..., 0]  # (B, K)
    u = torch.rand(b, k, generator=generator, device=p.device)
    ok = u * q_draft < p_draft  # u < p/q without dividing by a possibly tiny q
    # accepted = length of the all-true prefix
    accepted = torch.cumprod(ok.to(torch.long), dim=1).sum(dim=1)  # (B,)
    # Distribution for the token after the accepted prefix: residual at a rejection, p at the end.
    rows = torch.arange(b, device=p.device)
    residual = torch.zeros_like(p[:, 0])
    at = accepted.clamp(max=k - 1) if k > 0 else accepted
    if k > 0:
        residual = (p[rows, at] - q[rows, at]).clamp(min=0)
    bonus = p[rows, accepted.clamp(max=k)]
    final = torch.where((accepted < k)[:, None], residual, bonus)
    # A zero residual cannot occur after a rejection (p != q there); guard against rounding.
    final = torch.where(final.sum(-1, keepdim=True) > 0, final, bonus)
    u2 = torch.rand(b, 1, generator=generator, device=p.device)
    cdf = final.cumsum(-1)
    last = torch.searchsorted(cdf, u2 * cdf[:, -1:], right=True)[:, 0].clamp(max=p.shape[-1] - 1)
    tokens = torch.cat([draft_tokens, torch.zeros_like(draft_tokens[:, :1])], dim=1)  # (B, K+1)
    tokens[rows, accepted] = last
    token_logprobs = target_logprobs.gather(2, tokens[..., None])[..., 0]  # (B, K+1)
    return accepted, tokens, token_logprobs
