"""MTP drafting through int8 copies of the head's weights: a cheaper draft, decoding still exact.

    head = Int8DraftHead(model)          # model: a NemotronH policy with MTP heads (`models/mtp.py`)
    h = head.step(embeds, hidden)        # (B, D), (B, D) -> the next draft hidden state (B, D)
    logits = head.logits(h)              # (B, V) through an int8 copy of `lm_head`
    head.invalidate()                    # after the policy's weights change: rebuilt at the next step

At batch 1 a draft step reads every weight of the MTP layer (fusion, attention's value and output
projections, the latent MoE with two experts and the shared expert) and the output head: about
40 MB on the 100M preset, 3.6 ms a step, two steps a verification. The projections here hold int8
weights with one scale per output row (`small_linear_i8` in `models/csrc/decode_kernels.cpp`,
which widens them to float in registers; activations and sums stay float32): a quarter of the
bytes. Speculative decoding stays exact whatever the draft distribution q is, as long as
the acceptance test uses the q the draft was sampled from (`rollout/speculative.py`); quantized
weights only move q away from the policy, which costs acceptance, not exactness. Norms, the
router and the recurrence of the draft (none: drafts attend within their own position) stay fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.cpu_kernels import kernels
from models.fast_nemotron_h import _rms


def _packed(weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple:
    """An (out, in) fp32 weight as (int8 weight, fp32 scale per output row, bias): symmetric, so a
    row's largest magnitude maps to 127."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return q, scale.contiguous(), None if bias is None else bias.detach().float().contiguous()


def _linear(packed: tuple, x: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ the int8 weight's transpose, times its scales, plus its bias: through the fused
    kernel (each weight byte read once for up to 8 rows), 8 rows at a time."""
    q, scale, bias = packed
    fused = kernels() if x.device.type == "cpu" and x.dtype == torch.float32 else None
    if fused is None:  # no compiled kernels: the same sums, eagerly
        y = F.linear(x, q.float()) * scale
        return y if bias is None else y + bias
    flat = x.reshape(-1, x.shape[-1])
    out = torch.cat([fused.small_linear_i8(flat[i: i + 8], q, scale, bias) for i in range(0, flat.shape[0], 8)])
    return out.view(*x.shape[:-1], q.shape[0])


def _lin(layer: torch.nn.Linear) -> tuple:
    return _packed(layer.weight, layer.bias)


class Int8DraftHead:
    """int8 copies of a NemotronH policy's MTP layer and output head, built lazily and again after
    `invalidate()` (the engine calls it when new weights arrive)."""

    def __init__(self, model: torch.nn.Module) -> None:
        head = getattr(model, "mtp", None)
        if head is None:
            raise ValueError("int8 drafting needs a policy with MTP heads (`estuary model add-mtp`)")
        unknown = set(head.kinds) - {"full_attention", "moe"}
        if unknown:
            raise ValueError(f"int8 drafting supports MTP blocks of attention and MoE, not {sorted(unknown)}")
        self.model, self.head = model, head
        c = model.config
        self.eps, self.kv_heads, self.heads, self.head_dim = (
            c.layer_norm_epsilon, c.num_key_value_heads, c.num_attention_heads, c.head_dim)
        self._packs: dict | None = None

    def invalidate(self) -> None:
        self._packs = None

    def _build(self) -> dict:
        packs: dict = {"eh": _lin(self.head.layers[0].eh_proj), "lm_head": _lin(self.model.lm_head)}
        for i, (kind, block) in enumerate(zip(self.head.kinds, self.head.layers, strict=True)):
            mixer = block.mixer
            if kind == "full_attention":
                packs[i] = {"v": _lin(mixer.v_proj), "o": _lin(mixer.o_proj)}
            else:
                experts = mixer.experts
                packs[i] = {
                    "fc1": _lin(mixer.fc1_latent_proj), "fc2": _lin(mixer.fc2_latent_proj),
                    "shared_up": _lin(mixer.shared_experts.up_proj),
                    "shared_down": _lin(mixer.shared_experts.down_proj),
                    "up": [_packed(w) for w in experts.up_proj],  # (E, inter, latent): each a Linear weight
                    "down": [_packed(w) for w in experts.down_proj],
                }
        return packs

    @torch.no_grad()
    def step(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """`models.mtp.MTPHead.forward` on int8 projections: embeds, hidden (B, D) -> (B, D)."""
        if self._packs is None:
            self._packs = self._build()
        packs, first = self._packs, self.head.layers[0]
        fused = torch.cat([_rms(embeds, first.enorm.weight, self.eps), _rms(hidden, first.hnorm.weight, self.eps)], -1)
        h, delta = _linear(packs["eh"], fused), None
        for i, (kind, block) in enumerate(zip(self.head.kinds, self.head.layers, strict=True)):
            h = h if delta is None else h + delta
            x = _rms(h, block.norm.weight, self.eps)
            if kind == "full_attention":  # one position: the softmax weight is 1, the output is v
                v = _linear(packs[i]["v"], x).view(-1, self.kv_heads, 1, self.head_dim)
                v = v.expand(-1, -1, self.heads // self.kv_heads, -1).reshape(x.shape[0], -1)
                delta = _linear(packs[i]["o"], v)
            else:
                delta = self._moe(block.mixer, packs[i], x)
        h = h + delta
        return _rms(h, self.head.layers[-1].final_layernorm.weight, self.eps)

    def _moe(self, moe, packs: dict, x: torch.Tensor) -> torch.Tensor:
        """NemotronH's latent MoE on int8 experts; the router is the policy's own (fp32)."""
        _, weights, chosen = moe.gate(x)  # (B, k) each
        latent = _linear(packs["fc1"], x)  # (B, L)
        out = torch.zeros_like(latent)
        act = moe.experts.act_fn
        for expert in chosen.unique().tolist():  # each chosen expert once, over the rows that chose it
            rows, slot = (chosen == expert).nonzero(as_tuple=True)
            y = _linear(packs["down"][expert], act(_linear(packs["up"][expert], latent[rows])))
            out.index_add_(0, rows, y * weights[rows, slot, None])
        shared = _linear(packs["shared_down"], moe.shared_experts.act_fn(_linear(packs["shared_up"], x)))
        return _linear(packs["fc2"], out) + shared

    @torch.no_grad()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self._packs is None:
            self._packs = self._build()
        return _linear(self._packs["lm_head"], h).float()
