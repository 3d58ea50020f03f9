"""Multi-token-prediction (MTP) heads for NemotronH, in the layout vLLM reads.

One shared MTP layer (applied repeatedly for several draft steps) made of the blocks of
`config.mtp_layers_block_type` (default `*E`: attention then MoE), with the fusion in front and a
norm behind, stored under `mtp.*`:

    mtp.layers.0.enorm.weight, mtp.layers.0.hnorm.weight, mtp.layers.0.eh_proj.weight
    mtp.layers.{i}.norm.weight, mtp.layers.{i}.mixer.*       (one NemotronH block each)
    mtp.layers.{last}.final_layernorm.weight

Input at position t: the embedding of token t+1 and the target's final (normed) hidden state at
t; output: a hidden state whose logits (through the policy's own `lm_head`) predict token t+2,
and which feeds the next draft step. The heads live in `mtp.safetensors` beside the policy's own
weights and `num_nextn_predict_layers: 1` in config.json; plain transformers loads only
`model.safetensors` and so ignores them.

Estuary's drafts attend within the current position only (the target's hidden state carries
the context), in training and drafting alike, so drafting needs no cache of its own.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHBlock, NemotronHRMSNorm

MTP_FILE = "mtp.safetensors"
PREFIX = "mtp."


class MTPHead(nn.Module):
    """The shared MTP layer: fusion, NemotronH blocks, final norm."""

    def __init__(self, config) -> None:
        super().__init__()
        pattern = list(config.mtp_layers_block_type or ["full_attention", "moe"])
        block_cfg = copy.deepcopy(config)
        block_cfg.layers_block_type = pattern
        eps = config.layer_norm_epsilon
        self.layers = nn.ModuleList(NemotronHBlock(block_cfg, layer_idx=i) for i in range(len(pattern)))
        first, last = self.layers[0], self.layers[-1]
        first.enorm = NemotronHRMSNorm(config.hidden_size, eps=eps)
        first.hnorm = NemotronHRMSNorm(config.hidden_size, eps=eps)
        first.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        last.final_layernorm = NemotronHRMSNorm(config.hidden_size, eps=eps)
        self.kinds = pattern

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """embeds, hidden (..., D) -> next hidden (..., D); positions are independent."""
        first = self.layers[0]
        h = first.eh_proj(torch.cat([first.enorm(embeds), first.hnorm(hidden)], dim=-1))
        for kind, block in zip(self.kinds, self.layers, strict=True):
            x = block.norm(h)
            if kind == "full_attention":
                # Attention over the current position alone: softmax of one score is 1.
                attn = block.mixer
                v = attn.v_proj(x)
                rep = attn.config.num_attention_heads // attn.config.num_key_value_heads
                v = v.unflatten(-1, (-1, attn.head_dim)).repeat_interleave(rep, dim=-2).flatten(-2)
                h = h + attn.o_proj(v)
            elif kind == "moe":
                shape = x.shape
                h = h + block.mixer(x.reshape(-1, shape[-1])[None]).reshape(shape)
            else:
                h = h + block.mixer(x)
        return self.layers[-1].final_layernorm(h)


def add_mtp_heads(model: nn.Module, seed: int = 0) -> MTPHead:
    """Attach freshly initialised heads to a NemotronH policy (`model.mtp`) and mark the config."""
    if model.config.model_type != "nemotron_h":
        raise ValueError(f"MTP heads are defined for nemotron_h policies, not {model.config.model_type}")
    if "moe" not in model.config.layers_block_type:  # a dense policy gets a dense MTP block
        model.config.mtp_layers_block_type = [
            "mlp" if k == "moe" else k for k in model.config.mtp_layers_block_type]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = MTPHead(model.config)
        for name, p in head.named_parameters():
            if "norm" in name or name.endswith(("D", "dt_bias")):
                continue
            if p.dim() >= 2:
                nn.init.normal_(p, std=model.config.initializer_range)
    p0 = next(model.parameters())
    model.mtp = head.to(p0.device, p0.dtype)
    model.config.num_nextn_predict_layers = 1
    model.config.mtp_layers_block_type = head.kinds
    return model.mtp


_FUSED = re.compile(r"^(.*\.experts)\.(up_proj|down_proj)$")
_SPLIT = re.compile(r"^(.*\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")


def to_checkpoint_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused (E, out, in) expert tensors -> one `experts.{e}.{proj}.weight` per expert, `mtp.` prefix.

    That is how NemotronH checkpoints (and transformers' own save) store experts, and what
    vLLM's NemotronH-MTP loader maps from.
    """
    out = {}
    for key, value in state.items():
        match = _FUSED.match(key)
        if match:
            for e in range(value.shape[0]):
                out[f"{PREFIX}{match[1]}.{e}.{match[2]}.weight"] = value[e].detach().contiguous().cpu()
        else:
            out[PREFIX + key] = value.detach().contiguous().cpu()
    return out


def from_checkpoint_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `to_checkpoint_layout` (keys without the `mtp.` prefix, experts fused)."""
    plain, experts = {}, {}
    for key, value in state.items():
        if not key.startswith(PREFIX):
            continue
        key = key[len(PREFIX):]
        match = _SPLIT.match(key)
        if match:
            experts.setdefault(f"{match[1]}.{match[3]}", {})[int(match[2])] = value
        else:
            plain[key] = value
    for key, parts in experts.items():
        plain[key] = torch.stack([parts[e] for e in sorted(parts)])
    return plain


def save_mtp_heads(model: nn.Module, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `mtp.safetensors` (keys `mtp.*`) and record the heads in config.json.

    `state`: the heads' weights when the live module holds only a shard (ZeRO-3).
    """
    out = Path(out_dir)
    heads = model.mtp.state_dict() if state is None else state
    save_file(to_checkpoint_layout({k: v.contiguous() for k, v in heads.items()}), out / MTP_FILE)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["num_nextn_predict_layers"] = 1
    config["mtp_layers_block_type"] = model.mtp.kinds
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out / MTP_FILE


def load_mtp_heads(model: nn.Module, directory: str | Path) -> MTPHead | None:
    """Attach the heads saved in `directory`, if there are any; returns them or None."""
    path = Path(directory) / MTP_FILE
    if not path.is_file():
        return None
    head = MTPHead(model.config)
    head.load_state_dict(from_checkpoint_layout(load_file(path)))
    p0 = next(model.parameters())
    model.mtp = head.to(p0.device, p0.dtype)
    return model.mtp


@contextmanager
def _frozen(*modules: nn.Module) -> Iterator[None]:
    """Keep these modules' weights out of the autograd graph built inside the block.

    The modules are still called (not F.linear on their `.weight`): under ZeRO-3 a weight holds
    only its shard outside its own module's forward, whose hooks gather it.
    """
    trained = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in trained:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trained:
            p.requires_grad_(True)


def mtp_logits(model: nn.Module, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Training-time MTP logits: input_ids (B, T), target final hidden (B, T, D) -> (B, T-1, V).

    Row t uses token t+1 and hidden t, and predicts token t+2. The policy's embeddings and
    `lm_head` are used as constants: the MTP loss's gradient reaches only `mtp.*` (and `hidden`,
    which the learner detaches), so the auxiliary loss never moves the policy. The values are
    those of drafting (`models.fast_nemotron_h` calls the same modules).
    """
    with _frozen(model.get_input_embeddings()):
        embeds = model.get_input_embeddings()(input_ids[:, 1:])  # (B, T-1, D), no grad
    h = model.mtp(embeds, hidden[:, :-1])  # (B, T-1, D)
    with _frozen(model.lm_head):
        return model.lm_head(h).float()  # (B, T-1, V): grad flows to h only


def mtp_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of MTP predictions against the tokens two ahead.

    logits (B, T-1, V) from `mtp_logits`; input_ids (B, T); mask (B, T) marks tokens that count
    as targets (e.g. the response). Returns the mean over counted targets (a scalar).
    """
    targets = input_ids[:, 2:]  # (B, T-2)
    pred = logits[:, :-1]  # the last row predicts beyond the sequence
    losses = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1), reduction="none")
    weights = torch.ones_like(targets, dtype=losses.dtype) if mask is None else mask[:, 2:].to(losses.dtype)
    return (losses * weights.reshape(-1)).sum() / weights.sum().clamp(min=1)


def mtp_distill_loss(model: nn.Module, input_ids: torch.Tensor, hidden: torch.Tensor,
                     mask: torch.Tensor | None = None, steps: int = 1) -> torch.Tensor:
    """KL(policy || head) of `steps` chained draft steps, against the policy's own distributions.

    input_ids (B, T); hidden (B, T, D): the policy's final (normed) hidden states, row t after
    token t; mask (B, T) marks the policy's tokens. Draft step k (1..steps) at row t reads token
    t+k and the previous step's output (step 1: hidden t), as the engine drafts, and predicts
    token t+k+1, whose distribution under the policy is `lm_head(hidden[t+k])`. It counts where
    tokens t+1..t+k+1 are all the policy's: the engine's drafts start from a sampled token and
    never read a prompt's or an environment's (and so a shared prompt's rows and the same rows
    apart count alike, whatever the depth). Returns the mean over steps of each step's mean KL
    over counted rows (a scalar).

    Why not `mtp_loss`: a draft is accepted with probability sum_x min(p, q) = 1 - TV(p, q), so
    the head should match the policy's whole distribution. The sampled token's cross-entropy has
    the same minimum but estimates it from one draw per position; the policy's distribution is at
    hand. And the engine feeds a step's output into the next draft step, so training only the first
    step leaves the second reading hidden states unlike any it was fitted on.
    """
    emb, head = model.get_input_embeddings(), model.lm_head
    with _frozen(emb):
        embeds = emb(input_ids)  # (B, T, D), no grad
    with torch.no_grad(), _frozen(head):
        target = head(hidden).float().log_softmax(-1)  # (B, T, V): row t, the policy's token t+1
    weights = torch.ones_like(input_ids, dtype=target.dtype) if mask is None else mask.to(target.dtype)
    h, total = hidden, target.new_zeros(())
    chain = weights[:, 1:]  # (B, T-1): row t, token t+1 is the policy's
    for k in range(1, steps + 1):
        h = model.mtp(embeds[:, k:], h[:, :-1])  # (B, T-k, D): row t predicts token t+k+1
        with _frozen(head):
            draft = head(h).float().log_softmax(-1)  # grad flows to h only
        kl = F.kl_div(draft, target[:, k:], log_target=True, reduction="none").sum(-1)  # (B, T-k)
        chain = chain[:, :-1] * weights[:, k + 1:]  # (B, T-1-k): tokens t+1..t+k+1 all the policy's
        # the last row's token is beyond the sequence: not counted
        w = torch.cat([chain, weights.new_zeros(weights.shape[0], 1)], dim=1)  # (B, T-k)
        total = total + (kl * w).sum() / w.sum().clamp(min=1)
    return total / steps
