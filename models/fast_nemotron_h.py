"""Incremental NemotronH forward for generation: slot-based Mamba-2 state and KV caches.

Runs on the weights of a `transformers` `NemotronHForCausalLM` (shared, not copied: a weight
update to the HF model is seen at once) and matches its full-sequence logits. What it adds:

- a `DecodeState` with one slot per sequence: Mamba conv window (S, conv_dim, k-1), SSM state
  (S, heads, head_dim, d_state) in fp32, and a KV cache (S, max_len, kv_heads, head_dim) per
  attention layer, with a length per slot;
- `extend(state, slot, tokens)`: prefill or continue one sequence from its state (multi-turn
  continuation costs only the new tokens);
- `decode(state, slots, tokens)`: one token for each of a batch of slots (continuous batching:
  any set of slots, any lengths);
- `snapshot`/`restore` of a slot's recurrent state, for speculative decoding's rollback;
- `verify`/`rollback`: several tokens per slot in one pass and the state after each, for
  speculative decoding; `mtp_step`: the MTP head's draft step.

The SSM prefill uses the learner's chunked scan (`models/mamba_chunked.mixer_scan`), the decode step
its recurrence; dt is clamped at `time_step_min` as in the full forward the learner trains with.
On CPU in fp32, decode and verify run the Mamba step, the attention over a slot's cache, the
routed experts and the residual norms as fused C++ kernels (`models/cpu_kernels.py`): at decode
batch sizes the eager path's ~35 small ops per layer cost more in dispatch than in arithmetic.
The eager path stays as the reference, the GPU path and the fallback, with the same numerics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.activations import ReLUSquaredActivation

from models.attention import as_range, attend
from models.cpu_kernels import kernels
from models.decode_state import ContextOverflow, DecodeState
from models.mamba_chunked import mixer_scan


@dataclass
class _Dims:
    heads: int
    head_dim: int
    groups: int
    d_state: int
    d_inner: int
    conv_dim: int
    kernel: int
    dt_min: float
    kv_heads: int = 0
    attn_head_dim: int = 0
    attn_heads: int = 0
    layer_types: list[str] = field(default_factory=list)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x32).to(x.dtype)


# Up to this many tokens `extend` runs through the fused decode kernels (CPU fp32): on the tiny
# preset, one thread, 8/24/40/56/80 tokens took 2.6/4.8/6.9/8.8/14.2 ms there against
# 10.1/11.2/13.4/13.5/14.7 ms through the chunked scan.
SHORT_EXTEND = 48


class FastNemotronH:
    """Slot-based incremental decoding over a transformers NemotronH model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        c = model.config
        d_inner = c.mamba_num_heads * c.mamba_head_dim
        self.dims = _Dims(
            heads=c.mamba_num_heads, head_dim=c.mamba_head_dim, groups=c.n_groups,
            d_state=c.ssm_state_size, d_inner=d_inner,
            conv_dim=d_inner + 2 * c.n_groups * c.ssm_state_size, kernel=c.conv_kernel,
            dt_min=c.time_step_min, kv_heads=c.num_key_value_heads,
            attn_head_dim=c.head_dim, attn_heads=c.num_attention_heads,
            layer_types=list(c.layers_block_type),
        )
        self.eps = c.layer_norm_epsilon
        self.layers = model.model.layers
        self._cache: dict[int, tuple[tuple[int, int], torch.Tensor]] = {}

    # -- state --------------------------------------------------------------------------------
    def new_state(self, slots: int, max_len: int) -> DecodeState:
        d, p = self.dims, next(self.model.parameters())
        state = DecodeState(slots=slots, max_len=max_len, device=p.device)
        for i, kind in enumerate(d.layer_types):
            if kind == "linear_attention":
                state.tensors[f"{i}.conv"] = torch.zeros(slots, d.conv_dim, d.kernel - 1, dtype=p.dtype, device=p.device)
                state.tensors[f"{i}.ssm"] = torch.zeros(slots, d.heads, d.head_dim, d.d_state, dtype=torch.float32, device=p.device)
            elif kind == "full_attention":
                shape = (slots, max_len, d.kv_heads, d.attn_head_dim)
                state.tensors[f"{i}.k"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
                state.tensors[f"{i}.v"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        return state

    # -- forward ------------------------------------------------------------------------------
    @torch.no_grad()
    def extend(self, state: DecodeState, slot: int, tokens: torch.Tensor, routing: list | None = None,
               return_hidden: bool = False, last: bool = False):
        """Run `tokens` (T,) after slot's current state; returns logits (T, vocab), or (1, vocab)
        for the last token alone with `last` (the engine samples from no other: the head over
        every prompt position is T x vocab of work and memory for nothing), and the final hidden
        states (T, D) with `return_hidden`, for MTP drafting."""
        start = int(state.lengths[slot])
        state.check_room(slot, tokens.numel())
        embeds = self.model.model.embeddings(tokens[None])  # (1, T, D)
        fused = _fused_for(embeds)
        if fused is not None and tokens.numel() <= SHORT_EXTEND and routing is None:
            # A short run (a multi-turn continuation: the environment's reply in the chat
            # template) through the fused decode kernels, the recurrence token by token: the
            # chunked scan costs about as much for 8 tokens as for 64.
            slots = torch.tensor([slot], device=tokens.device)
            lengths = state.lengths[slots].clone()
            h = self._layers(
                embeds, mamba=lambda mixer, i, x: self._mamba_fused(fused, mixer, state, i, slots, x),
                attention=lambda mixer, i, x: self._attn_fused(fused, mixer, state, i, slots, lengths, x),
                routing=None)
        else:
            h = self._layers(
                embeds,
                mamba=lambda mixer, i, x: self._mamba_extend(mixer, state, i, slot, x),
                attention=lambda mixer, i, x: self._attn_extend(mixer, state, i, slot, start, x),
                routing=routing,
            )
        state.lengths[slot] = start + tokens.numel()
        hidden = h[0]
        logits = _linear(self.model.lm_head, hidden[-1:] if last else hidden).float()
        return (logits, hidden) if return_hidden else logits

    @torch.no_grad()
    def decode(self, state: DecodeState, slots: torch.Tensor, tokens: torch.Tensor,
               routing: list | None = None, return_hidden: bool = False):
        """One token per slot: slots (B,), tokens (B,) -> logits (B, vocab) (and the final hidden
        states (B, D) with `return_hidden`, for MTP drafting)."""
        lengths = state.lengths[slots]
        state.check_room_many(slots)
        h = self._layers(
            self.model.model.embeddings(tokens),  # (B, D)
            mamba=lambda mixer, i, x: self._mamba_step(mixer, state, i, slots, x),
            attention=lambda mixer, i, x: self._attn_step(mixer, state, i, slots, lengths, x),
            routing=routing,
        )
        state.lengths[slots] = lengths + 1
        logits = _linear(self.model.lm_head, h).float()
        return (logits, h) if return_hidden else logits

    @torch.no_grad()
    def verify(self, state: DecodeState, slots: torch.Tensor, tokens: torch.Tensor):
        """T tokens per slot in one pass (speculative verification).

        slots (B,), tokens (B, T) -> logits (B, T, V), final hidden states (B, T, D), and the
        recurrent state after every position, for `rollback`.
        """
        b, t = tokens.shape
        lengths = state.lengths[slots].clone()
        if bool((lengths + t > state.max_len).any()):
            raise ContextOverflow(f"a sequence would exceed max_len={state.max_len}")
        history: dict[str, torch.Tensor] = {}
        h = self._layers(
            self.model.model.embeddings(tokens),  # (B, T, D)
            mamba=lambda mixer, i, x: self._mamba_multi(mixer, state, i, slots, x, history),
            attention=lambda mixer, i, x: self._attn_multi(mixer, state, i, slots, lengths, x),
            routing=None,
        )
        state.lengths[slots] = lengths + t
        hidden = h
        return _linear(self.model.lm_head, hidden).float(), hidden, (history, lengths)

    @torch.no_grad()
    def mtp_step(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The MTP head (`models.mtp.MTPHead.forward`) on the fused kernels where they serve:
        embeds, hidden (B, D) -> next hidden (B, D). Attention sees the current position only."""
        head, fused = self.model.mtp, _fused_for(hidden)
        if fused is None:
            return head(embeds, hidden)
        first = head.layers[0]
        both = [fused.residual_rms(embeds.contiguous(), None, first.enorm.weight, self.eps),
                fused.residual_rms(hidden.contiguous(), None, first.hnorm.weight, self.eps)]
        h, delta = _linear(first.eh_proj, torch.cat(both, dim=-1)), None
        for kind, block in zip(head.kinds, head.layers, strict=True):
            h, x = self._residual_norm(fused, h, delta, block.norm.weight)
            if kind == "full_attention":  # one position: the softmax weight is 1, output = v
                attn, d = block.mixer, self.dims
                v = _linear(attn.v_proj, x).view(-1, d.kv_heads, 1, d.attn_head_dim)
                v = v.expand(-1, -1, d.attn_heads // d.kv_heads, -1).reshape(x.shape[0], -1)
                delta = _linear(attn.o_proj, v)
            elif kind == "moe":
                delta = self._moe(block.mixer, x, None)
            else:
                delta = block.mixer(x)
        return self._residual_norm(fused, h, delta, head.layers[-1].final_layernorm.weight)[1]

    def rollback(self, state: DecodeState, slots: torch.Tensor, keep: torch.Tensor, saved) -> None:
        """Keep the first `keep[b]` (>= 1) verified tokens of each slot, as if only they were fed."""
        history, lengths = saved
        rows = torch.arange(slots.numel(), device=slots.device)
        for name, per_position in history.items():  # (B, T, ...) state after each position
            fused = _fused_for(per_position)
            if fused is not None:  # copies only the rows that rejected a draft
                fused.restore_rows(state.tensors[name], per_position, slots, keep)
            else:
                state.tensors[name][slots] = per_position[rows, keep - 1]
        state.lengths[slots] = lengths + keep

    def _layers(self, h: torch.Tensor, mamba, attention, routing: list | None) -> torch.Tensor:
        """The residual stack and final norm, shared by extend/decode/verify: they differ only in
        how Mamba and attention layers use the state (`mamba(mixer, i, x)`, `attention(mixer, i, x)`).
        Returns the normed final hidden states."""
        fused, delta = _fused_for(h), None
        if fused is not None:
            h = h.contiguous()  # the embedding output, ours to update in place
        for i, layer in enumerate(self.layers):
            h, x = self._residual_norm(fused, h, delta, layer.norm.weight)
            kind = self.dims.layer_types[i]
            if kind == "linear_attention":
                delta = mamba(layer.mixer, i, x)
            elif kind == "full_attention":
                delta = attention(layer.mixer, i, x)
            elif kind == "moe":  # experts see a flat list of tokens
                delta = self._moe(layer.mixer, x.reshape(-1, x.shape[-1]), routing).view(x.shape)
            else:
                delta = layer.mixer(x)
        return self._residual_norm(fused, h, delta, self.model.model.norm_f.weight)[1]

    def _residual_norm(self, fused, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor):
        """(h + delta, its RMSNorm); the fused kernel adds delta into h in place."""
        if fused is not None:
            return h, fused.residual_rms(h, delta, weight, self.eps)
        h = h if delta is None else h + delta
        return h, _rms(h, weight, self.eps)

    # -- Mamba-2 ------------------------------------------------------------------------------
    def _split(self, mixer, x: torch.Tensor):
        d = self.dims
        zxbcdt = _linear(mixer.in_proj, x)
        return zxbcdt.split([d.d_inner, d.conv_dim, d.heads], dim=-1)

    def _mamba_extend(self, mixer, state: DecodeState, i: int, slot: int, x: torch.Tensor):
        d = self.dims
        T = x.shape[1]
        gate, xbc, dt = self._split(mixer, x)  # (1, T, *)
        conv_prev = state.tensors[f"{i}.conv"][slot]  # (C, k-1)
        window = torch.cat([conv_prev, xbc[0].T], dim=1)  # (C, k-1+T)
        conv = F.conv1d(window[None], mixer.conv1d.weight, mixer.conv1d.bias, groups=d.conv_dim)
        xbc_act = F.silu(conv)[0].T[None]  # (1, T, C)
        state.tensors[f"{i}.conv"][slot] = window[:, -(d.kernel - 1):]
        xs, B, C = xbc_act.split([d.d_inner, d.groups * d.d_state, d.groups * d.d_state], dim=-1)
        y, final = mixer_scan(mixer, xs, dt, B, C, initial=state.tensors[f"{i}.ssm"][slot:slot + 1])
        state.tensors[f"{i}.ssm"][slot] = final[0]
        y = mixer.norm(y.reshape(1, T, d.d_inner), gate)
        return _linear(mixer.out_proj, y.to(x.dtype))

    def _mamba_fused(self, fused, mixer, state: DecodeState, i: int, slots: torch.Tensor, x: torch.Tensor,
                     history: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D) through the fused CPU kernel (models/cpu_kernels.py)."""
        d = self.dims
        out = fused.mamba_decode(
            _linear(mixer.in_proj, x).contiguous(), state.tensors[f"{i}.conv"], state.tensors[f"{i}.ssm"], slots,
            mixer.conv1d.weight.view(d.conv_dim, d.kernel), mixer.conv1d.bias, mixer.dt_bias, mixer.A_log,
            mixer.D, mixer.norm.weight, d.groups, mixer.norm.group_size, d.dt_min,
            mixer.norm.variance_epsilon, history is not None)
        if history is not None:
            history[f"{i}.conv"], history[f"{i}.ssm"] = out[1], out[2]
        return _linear(mixer.out_proj, out[0])

    def _mamba_step(self, mixer, state: DecodeState, i: int, slots: torch.Tensor, x: torch.Tensor):
        fused = _fused_for(x)
        if fused is not None:
            return self._mamba_fused(fused, mixer, state, i, slots, x[:, None])[:, 0]
        d = self.dims
        b, rep = x.shape[0], d.heads // d.groups
        gate, xbc, dt = self._split(mixer, x)  # (B, *)
        run = as_range(slots)
        conv_all, ssm_all = state.tensors[f"{i}.conv"], state.tensors[f"{i}.ssm"]
        conv_prev = conv_all[run] if run is not None else conv_all[slots]
        window = torch.cat([conv_prev, xbc[:, :, None]], dim=2)  # (B, C, k)
        w = mixer.conv1d.weight[:, 0, :]  # (C, k)
        xbc_act = F.silu((window * w).sum(-1) + (mixer.conv1d.bias if mixer.conv1d.bias is not None else 0))
        xs, B, C = xbc_act.split([d.d_inner, d.groups * d.d_state, d.groups * d.d_state], dim=-1)
        dt = F.softplus(dt.float() + mixer.dt_bias.float()).clamp(min=d.dt_min)  # (B, H)
        dA = torch.exp(dt * -torch.exp(mixer.A_log.float()))  # (B, H)
        xs = xs.float().view(b, d.heads, d.head_dim)  # (B, H, P)
        # Heads of a group share B and C: view the state as (B, G, rep*P, N), no repeat needed.
        dtx = (dt[:, :, None] * xs).view(b, d.groups, rep * d.head_dim, 1)
        Bg = B.float().view(b, d.groups, 1, d.d_state)
        Cg = C.float().view(b, d.groups, 1, d.d_state)
        if run is not None:  # contiguous slots: update the state in place, no gather/scatter
            conv_all[run] = window[:, :, 1:]
            ssm = ssm_all[run]
            ssm.mul_(dA[:, :, None, None])
            ssm.view(b, d.groups, rep * d.head_dim, d.d_state).add_(dtx * Bg)
        else:
            conv_all[slots] = window[:, :, 1:]
            ssm = ssm_all[slots] * dA[:, :, None, None]
            ssm = ssm + (dtx * Bg).view(b, d.heads, d.head_dim, d.d_state)
            ssm_all[slots] = ssm
        # (B, G, rep*P, N) . (B, G, 1, N) summed over N; a bmm of 1-column matrices is slower.
        y = (ssm.view(b, d.groups, rep * d.head_dim, d.d_state) * Cg).sum(-1)
        y = y.view(b, d.heads, d.head_dim) + mixer.D.float()[None, :, None] * xs
        y = mixer.norm(y.reshape(b, d.d_inner), gate)
        return _linear(mixer.out_proj, y.to(x.dtype))

    def _mamba_multi(self, mixer, state: DecodeState, i: int, slots: torch.Tensor, x: torch.Tensor,
                     history: dict[str, torch.Tensor]) -> torch.Tensor:
        """x (B, T, D): a short recurrence over T positions, recording the state after each."""
        fused = _fused_for(x)
        if fused is not None:
            return self._mamba_fused(fused, mixer, state, i, slots, x, history)
        d = self.dims
        b, t, _ = x.shape
        rep, k1 = d.heads // d.groups, d.kernel - 1
        gate, xbc, dt = self._split(mixer, x)  # (B, T, *)
        conv_all, ssm_all = state.tensors[f"{i}.conv"], state.tensors[f"{i}.ssm"]
        window = torch.cat([conv_all[slots], xbc.transpose(1, 2)], dim=2)  # (B, C, k-1+T)
        conv = F.conv1d(window, mixer.conv1d.weight, mixer.conv1d.bias, groups=d.conv_dim)  # (B, C, T)
        history[f"{i}.conv"] = window.unfold(2, k1, 1)[:, :, 1:].permute(0, 2, 1, 3)  # (B, T, C, k-1)
        xs, B, C = F.silu(conv).transpose(1, 2).split(
            [d.d_inner, d.groups * d.d_state, d.groups * d.d_state], dim=-1)
        dt = F.softplus(dt.float() + mixer.dt_bias.float()).clamp(min=d.dt_min)  # (B, T, H)
        dA = torch.exp(dt * -torch.exp(mixer.A_log.float()))
        xs = xs.float().view(b, t, d.heads, d.head_dim)
        dtx = (dt[..., None] * xs).view(b, t, d.groups, rep * d.head_dim, 1)
        Bg = B.float().view(b, t, d.groups, 1, d.d_state)
        Cg = C.float().view(b, t, d.groups, 1, d.d_state)
        ssm = ssm_all[slots].view(b, d.groups, rep * d.head_dim, d.d_state)
        states, ys = [], []
        for j in range(t):
            decay = dA[:, j].view(b, d.groups, rep, 1, 1).expand(-1, -1, -1, d.head_dim, -1)
            ssm = ssm * decay.reshape(b, d.groups, rep * d.head_dim, 1) + dtx[:, j] * Bg[:, j]
            states.append(ssm)
            ys.append((ssm * Cg[:, j]).sum(-1))
        history[f"{i}.ssm"] = torch.stack(states, 1).view(b, t, d.heads, d.head_dim, d.d_state)
        ssm_all[slots] = states[-1].view(b, d.heads, d.head_dim, d.d_state)
        conv_all[slots] = window[:, :, -k1:]
        y = torch.stack(ys, 1).view(b, t, d.heads, d.head_dim) + mixer.D.float()[:, None] * xs
        y = mixer.norm(y.reshape(b, t, d.d_inner), gate)
        return _linear(mixer.out_proj, y.to(x.dtype))

    def _attn_fused(self, fused, attn, state: DecodeState, i: int, slots: torch.Tensor,
                    lengths: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D) through the fused CPU kernel: no gather of the slots' caches."""
        d = self.dims
        b, t, _ = x.shape
        q = _linear(attn.q_proj, x).view(b, t, d.attn_heads, d.attn_head_dim)
        k = _linear(attn.k_proj, x).view(b, t, d.kv_heads, d.attn_head_dim)
        v = _linear(attn.v_proj, x).view(b, t, d.kv_heads, d.attn_head_dim)
        out = fused.attn_decode(q, k, v, state.tensors[f"{i}.k"], state.tensors[f"{i}.v"], slots, lengths,
                                attn.scaling)
        return _linear(attn.o_proj, out.view(b, t, -1))

    def _attn_multi(self, attn, state: DecodeState, i: int, slots: torch.Tensor, lengths: torch.Tensor,
                    x: torch.Tensor) -> torch.Tensor:
        fused = _fused_for(x)
        if fused is not None:
            return self._attn_fused(fused, attn, state, i, slots, lengths, x)
        d = self.dims
        b, t, _ = x.shape
        q = _linear(attn.q_proj, x).view(b, t, d.attn_heads, d.attn_head_dim)
        k = _linear(attn.k_proj, x).view(b, t, d.kv_heads, d.attn_head_dim)
        v = _linear(attn.v_proj, x).view(b, t, d.kv_heads, d.attn_head_dim)
        pos = lengths[:, None] + torch.arange(t, device=x.device)[None]  # (B, T)
        cache_k, cache_v = state.tensors[f"{i}.k"], state.tensors[f"{i}.v"]
        cache_k[slots[:, None], pos] = k
        cache_v[slots[:, None], pos] = v
        span = int(lengths.max()) + t
        keys, vals = cache_k[slots, :span], cache_v[slots, :span]
        allowed = torch.arange(span, device=x.device)[None, None, :] <= pos[:, :, None]  # (B, T, L)
        out = attend(q, keys, vals, key_mask=allowed, scale=attn.scaling)
        return _linear(attn.o_proj, out.reshape(b, t, -1))

    # -- attention (no RoPE in NemotronH) -----------------------------------------------------
    def _attn_extend(self, attn, state: DecodeState, i: int, slot: int, start: int, x: torch.Tensor):
        d = self.dims
        T = x.shape[1]
        q = _linear(attn.q_proj, x).view(T, d.attn_heads, d.attn_head_dim)
        k = _linear(attn.k_proj, x).view(T, d.kv_heads, d.attn_head_dim)
        v = _linear(attn.v_proj, x).view(T, d.kv_heads, d.attn_head_dim)
        state.tensors[f"{i}.k"][slot, start:start + T] = k
        state.tensors[f"{i}.v"][slot, start:start + T] = v
        keys = state.tensors[f"{i}.k"][slot, : start + T]  # (L, kvh, hd)
        vals = state.tensors[f"{i}.v"][slot, : start + T]
        out = attend(q[None], keys[None], vals[None], causal_offset=start, scale=attn.scaling)
        return _linear(attn.o_proj, out.reshape(1, T, -1))

    def _attn_step(self, attn, state: DecodeState, i: int, slots: torch.Tensor, lengths: torch.Tensor,
                   x: torch.Tensor):
        fused = _fused_for(x)
        if fused is not None:
            return self._attn_fused(fused, attn, state, i, slots, lengths, x[:, None])[:, 0]
        d = self.dims
        q = _linear(attn.q_proj, x).view(-1, 1, d.attn_heads, d.attn_head_dim)
        k = _linear(attn.k_proj, x).view(-1, d.kv_heads, d.attn_head_dim)
        v = _linear(attn.v_proj, x).view(-1, d.kv_heads, d.attn_head_dim)
        cache_k, cache_v = state.tensors[f"{i}.k"], state.tensors[f"{i}.v"]
        cache_k[slots, lengths] = k
        cache_v[slots, lengths] = v
        span = int(lengths.max()) + 1
        run = as_range(slots)
        rows = run if run is not None else slots  # a slice is a view: no copy of the cache
        keys, vals = cache_k[rows, :span], cache_v[rows, :span]  # (B, L, kvh, hd)
        valid = torch.arange(span, device=x.device)[None, :] <= lengths[:, None]  # (B, L)
        out = attend(q, keys, vals, key_mask=valid, scale=attn.scaling)
        return _linear(attn.o_proj, out.reshape(x.shape[0], -1))

    def _transposed(self, weight: torch.Tensor) -> torch.Tensor:
        """weight (E, a, b) as a contiguous (E, b, a), cached until the weight changes: an in-place
        update (a weight sync's `copy_`) bumps its version, a reassignment its storage."""
        key = (weight.data_ptr(), weight._version)
        cached = self._cache.get(id(weight))
        if cached is None or cached[0] != key:
            cached = (key, weight.detach().transpose(1, 2).contiguous())
            self._cache[id(weight)] = cached
        return cached[1]

    # -- MoE ----------------------------------------------------------------------------------
    def _moe(self, moe, x: torch.Tensor, routing: list | None) -> torch.Tensor:
        """x (T, D) -> (T, D); appends the (T, k) expert ids to `routing` when given."""
        fused, gate = _fused_for(x), moe.gate
        latent = _linear(moe.fc1_latent_proj, x)
        if fused is not None and gate.num_group == 1 and isinstance(moe.experts.act_fn, ReLUSquaredActivation):
            scores = F.linear(x, gate.weight.float()).sigmoid()  # as the router computes them
            out, experts, _ = fused.moe_experts(
                scores, gate.e_score_correction_bias, latent.contiguous(), self._transposed(moe.experts.up_proj),
                self._transposed(moe.experts.down_proj), gate.top_k, gate.norm_topk_prob,
                gate.routed_scaling_factor)
        else:
            _, weights, experts = gate(x)
            out = moe.experts(latent, experts, weights)
        if routing is not None:
            routing.append(experts.detach().to("cpu", torch.int16))
        return _linear(moe.fc2_latent_proj, out) + _mlp(moe.shared_experts, x)


SMALL_ROWS = 8  # up to this many rows, a projection runs through `small_linear` ...
SMALL_MIN_WEIGHT = 1 << 18  # ... if its weight has this many floats (1 MB): too big for the caches


def _linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x); at decode and verification sizes (at most SMALL_ROWS rows, CPU fp32) through the
    fused kernel that reads each weight row once for all rows: MKL's sgemm takes 2-3x as long for
    three rows as for one, which made verifying two drafts cost almost three decode steps. Only
    for weights streamed from memory: a tiny preset's sit in cache, where MKL is as fast or faster
    (drafting on `tiny-hybrid-moe-2attn` got slower through the kernel)."""
    fused = _fused_for(x)
    if (fused is not None and x.numel() <= SMALL_ROWS * layer.in_features
            and layer.weight.numel() >= SMALL_MIN_WEIGHT and layer.weight.is_contiguous()):
        return fused.small_linear(x, layer.weight, layer.bias)
    return layer(x)


def _mlp(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' NemotronHMLP (down(act(up(x)))) through `_linear`."""
    return _linear(mlp.down_proj, mlp.act_fn(_linear(mlp.up_proj, x)))


def _fused_for(x: torch.Tensor):
    """The fused kernels when they serve `x` (CPU fp32 and built), else None: the eager path."""
    return kernels() if x.device.type == "cpu" and x.dtype == torch.float32 else None
