"""Incremental forward for Llama-family attention models (Llama, Qwen2, Qwen3-dense, Mistral).

The same slot interface as `FastNemotronH` (`new_state`, `extend`, `decode`), over the weights
of the transformers model, with RoPE at each token's absolute position and a per-slot KV cache.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from models.attention import as_range, attend
from models.decode_state import DecodeState


class FastLlama:
    """Slot-based incremental decoding over a transformers Llama-style causal LM."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        c = model.config
        self.heads = c.num_attention_heads
        self.kv_heads = c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.layers = model.model.layers

    def new_state(self, slots: int, max_len: int) -> DecodeState:
        p = next(self.model.parameters())
        state = DecodeState(slots=slots, max_len=max_len, device=p.device)
        shape = (slots, max_len, self.kv_heads, self.head_dim)
        for i in range(len(self.layers)):
            state.tensors[f"{i}.k"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
            state.tensors[f"{i}.v"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        return state

    def _qkv(self, attn, x: torch.Tensor, positions: torch.Tensor):
        """x (B, T, D), positions (B, T) -> q (B, T, H, hd), k/v (B, T, kvh, hd) with RoPE."""
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        cos, sin = self.model.model.rotary_emb(x, positions)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v

    @torch.no_grad()
    def extend(self, state: DecodeState, slot: int, tokens: torch.Tensor, routing: list | None = None,
               last: bool = False) -> torch.Tensor:
        """Run `tokens` (T,) after slot's current state; logits (T, vocab), or (1, vocab) with `last`."""
        start = int(state.lengths[slot])
        state.check_room(slot, tokens.numel())
        T = tokens.numel()
        positions = torch.arange(start, start + T, device=tokens.device)[None]
        h = self.model.model.embed_tokens(tokens[None])
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(h), positions)
            state.tensors[f"{i}.k"][slot, start:start + T] = k[0]
            state.tensors[f"{i}.v"][slot, start:start + T] = v[0]
            keys = state.tensors[f"{i}.k"][slot, : start + T][None]
            vals = state.tensors[f"{i}.v"][slot, : start + T][None]
            out = attend(q, keys, vals, causal_offset=start, scale=attn.scaling)
            h = h + attn.o_proj(out.reshape(1, T, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        state.lengths[slot] = start + T
        return self.model.lm_head(self.model.model.norm(h[:, -1:] if last else h))[0].float()

    @torch.no_grad()
    def decode(self, state: DecodeState, slots: torch.Tensor, tokens: torch.Tensor,
               routing: list | None = None) -> torch.Tensor:
        lengths = state.lengths[slots]
        state.check_room_many(slots)
        h = self.model.model.embed_tokens(tokens)[:, None]  # (B, 1, D)
        span = int(lengths.max()) + 1
        valid = torch.arange(span, device=tokens.device)[None, :] <= lengths[:, None]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(h), lengths[:, None])
            cache_k, cache_v = state.tensors[f"{i}.k"], state.tensors[f"{i}.v"]
            cache_k[slots, lengths] = k[:, 0]
            cache_v[slots, lengths] = v[:, 0]
            run = as_range(slots)
            rows = run if run is not None else slots
            out = attend(q, cache_k[rows, :span], cache_v[rows, :span], key_mask=valid, scale=attn.scaling)
            h = h + attn.o_proj(out.reshape(h.shape[0], 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        state.lengths[slots] = lengths + 1
        return self.model.lm_head(self.model.model.norm(h))[:, 0].float()


def fast_decoder(model: torch.nn.Module):
    """The incremental decoder for a transformers causal LM, by its model type."""
    from models.fast_nemotron_h import FastNemotronH

    kind = model.config.model_type
    if kind == "nemotron_h":
        return FastNemotronH(model)
    if hasattr(model, "model") and hasattr(model.model, "rotary_emb") and hasattr(model.model, "embed_tokens"):
        return FastLlama(model)
    raise ValueError(f"no incremental decoder for model_type {kind!r}; supported: nemotron_h and "
                     "Llama-style attention models (llama, qwen2, qwen3, mistral)")
