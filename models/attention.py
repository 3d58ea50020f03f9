"""Attention over slot KV caches for the fast decoders (NemotronH has no RoPE; Llama-style
decoders apply theirs before calling): SDPA for prefill, two batched matmuls per KV head for a few
queries over a masked cache on CPU, where SDPA with a boolean mask is slow."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def as_range(slots: torch.Tensor) -> slice | None:
    """`slots` as a slice when they are consecutive and ascending (the common case)."""
    first, n = int(slots[0]), slots.numel()
    if int(slots[-1]) - first + 1 == n and (n == 1 or bool((slots[1:] - slots[:-1] == 1).all())):
        return slice(first, first + n)
    return None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            causal_offset: int | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Tq, H, hd), k/v (B, L, kvh, hd) -> (B, Tq, H, hd), with GQA by head repetition."""
    if key_mask is not None and q.device.type == "cpu":
        return attend_matmul(q, k, v, scale, key_mask)
    rep = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if rep > 1:  # SDPA's enable_gqa takes a slow path on CPU; repeating k/v is faster here
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    mask = None
    if causal_offset is not None:
        tq, L = q.shape[2], k.shape[2]
        mask = torch.arange(L, device=q.device)[None, :] <= (torch.arange(tq, device=q.device)[:, None] + causal_offset)
    elif key_mask is not None:  # (B, L) for all queries, or (B, Tq, L) per query
        mask = key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def attend_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   key_mask: torch.Tensor) -> torch.Tensor:
    """`attend` for few queries over a masked cache, as two batched matmuls per KV head.

    CPU SDPA with a boolean mask is ~10x slower than this at decode sizes (a 140-token cache at
    batch 64 took 6 ms), and GQA here needs no repeated K/V: the `rep` query heads of a KV head
    share its keys as rows of one matmul.
    """
    b, tq, h, hd = q.shape
    kvh = k.shape[2]
    rep = h // kvh
    qh = q.reshape(b, tq, kvh, rep, hd).permute(0, 2, 1, 3, 4).reshape(b, kvh, tq * rep, hd)
    scores = torch.matmul(qh, k.permute(0, 2, 3, 1)) * scale  # (B, kvh, Tq*rep, L)
    if key_mask.dim() == 2:  # (B, L): the same keys for every query
        mask = key_mask[:, None, None, :]
    else:  # (B, Tq, L): per query, repeated for the rep heads that share a KV head
        mask = key_mask[:, None, :, None, :].expand(-1, 1, -1, rep, -1).reshape(b, 1, tq * rep, -1)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    out = torch.matmul(probs, v.permute(0, 2, 1, 3))  # (B, kvh, Tq*rep, hd)
    return out.view(b, kvh, tq, rep, hd).permute(0, 2, 1, 3, 4).reshape(b, tq, h, hd)
