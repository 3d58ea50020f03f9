"""The numbers of a policy that memory depends on, from its config.json and nothing heavier.

    arch = architecture_of(cfg.model)      # model.path's config.json, a known model, or a tiny preset
    arch.params, arch.kv_bytes_per_token(2, tp=4), arch.mamba_bytes_per_sequence(2, 4, tp=4)

NemotronH (`nemotron_h`) parameters are counted here, shape by shape as transformers builds them
(checked against a meta-device model in tests); any other architecture is counted on the meta
device. A `model.path` that is not on this machine (a cluster path) is looked up by its folder
name among the models whose config.json is known below (Nemotron 3 Nano 30B-A3B).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from configs.errors import ConfigError
from configs.schema import ModelConfig

# config.json of NVIDIA-Nemotron-3-Nano-30B-A3B (the fields memory depends on): 23 Mamba-2, 23 MoE
# (128 routed experts, 6 per token, one shared expert) and 6 attention layers; 31.58e9 parameters.
NEMOTRON3_NANO = {
    "model_type": "nemotron_h", "vocab_size": 131072, "hidden_size": 2688, "tie_word_embeddings": False,
    "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 1856,
    "mamba_num_heads": 64, "mamba_head_dim": 64, "n_groups": 8, "ssm_state_size": 128, "conv_kernel": 4,
    "n_routed_experts": 128, "num_experts_per_tok": 6, "moe_intermediate_size": 1856,
    "moe_shared_expert_intermediate_size": 3712, "n_shared_experts": 1,
}
KNOWN = {"NVIDIA-Nemotron-3-Nano-30B-A3B": NEMOTRON3_NANO}
_BLOCKS = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}


@dataclass(frozen=True)
class Architecture:
    name: str
    params: int  # every parameter (routed experts included)
    hidden: int
    vocab: int
    layers: dict[str, int]  # layer kind (mamba, moe, attention, mlp) -> count
    kv_heads: int = 0
    head_dim: int = 0
    mamba_heads: int = 0
    mamba_head_dim: int = 0
    ssm_state: int = 0
    mamba_groups: int = 0
    conv_kernel: int = 0
    largest_layer: int = 0  # parameters of the biggest layer (what ZeRO-3 gathers at once)

    @property
    def n_layers(self) -> int:
        return sum(self.layers.values())

    def kv_bytes_per_token(self, dtype_bytes: int, tp: int = 1) -> int:
        """K and V of one token in every attention layer on one GPU (KV heads split by TP, at least one)."""
        heads = math.ceil(self.kv_heads / tp)
        return self.layers.get("attention", 0) * 2 * heads * self.head_dim * dtype_bytes

    def mamba_bytes_per_sequence(self, conv_bytes: int, ssm_bytes: int, tp: int = 1) -> int:
        """One sequence's Mamba state on one GPU: SSM state (heads x head_dim x state) and conv window."""
        d_inner = self.mamba_heads * self.mamba_head_dim
        conv_dim = d_inner + 2 * self.mamba_groups * self.ssm_state
        ssm = d_inner * self.ssm_state * ssm_bytes
        conv = conv_dim * (self.conv_kernel - 1) * conv_bytes
        return self.layers.get("mamba", 0) * math.ceil((ssm + conv) / tp)


def _nemotron_h_layers(c: dict) -> list[str]:
    if c.get("layers_block_type"):
        aliases = {"linear_attention": "mamba", "full_attention": "attention"}
        return [aliases.get(k, k) for k in c["layers_block_type"]]
    return [_BLOCKS[ch] for ch in c["hybrid_override_pattern"]]


def nemotron_h_params(c: dict) -> tuple[int, int]:
    """(parameters, largest layer's) of a NemotronH config, layer by layer as transformers shapes them."""
    h, v = c["hidden_size"], c["vocab_size"]
    total = v * h * (1 if c.get("tie_word_embeddings") else 2) + h  # embeddings, lm_head, final norm
    d_inner = c["mamba_num_heads"] * c["mamba_head_dim"]
    conv_dim = d_inner + 2 * c["n_groups"] * c["ssm_state_size"]
    per_kind = {
        "mamba": (2 * d_inner + 2 * c["n_groups"] * c["ssm_state_size"] + c["mamba_num_heads"]) * h  # in_proj
        + conv_dim * (c["conv_kernel"] + 1) + 3 * c["mamba_num_heads"] + d_inner + h * d_inner,
        "attention": 2 * h * c["num_attention_heads"] * c["head_dim"] + 2 * h * c["num_key_value_heads"] * c["head_dim"],
        "mlp": 2 * h * c.get("intermediate_size", 0),
    }
    if c.get("n_routed_experts"):
        latent = c.get("moe_latent_size") or h
        per_kind["moe"] = (2 * c["n_routed_experts"] * c["moe_intermediate_size"] * latent  # routed up/down
                           + c["n_routed_experts"] * h  # router
                           + 2 * h * c["moe_shared_expert_intermediate_size"] * c.get("n_shared_experts", 1)
                           + (2 * h * latent if c.get("moe_latent_size") else 0))
    kinds = _nemotron_h_layers(c)
    return total + sum(per_kind[k] + h for k in kinds), max(per_kind[k] + h for k in kinds)  # + a norm each


def _meta_params(c: dict) -> int:
    """Any other architecture: built on the meta device (no memory) and counted."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**c)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def from_config_dict(name: str, c: dict) -> Architecture:
    if c.get("model_type") == "nemotron_h":
        kinds = _nemotron_h_layers(c)
        params, largest = nemotron_h_params(c)
        return Architecture(
            name, params, c["hidden_size"], c["vocab_size"],
            {k: kinds.count(k) for k in dict.fromkeys(kinds)}, c["num_key_value_heads"], c["head_dim"],
            c["mamba_num_heads"], c["mamba_head_dim"], c["ssm_state_size"], c["n_groups"], c["conv_kernel"],
            largest)
    heads, params = c["num_attention_heads"], _meta_params(c)
    embeddings = c["vocab_size"] * c["hidden_size"] * (1 if c.get("tie_word_embeddings") else 2)
    return Architecture(name, params, c["hidden_size"], c["vocab_size"],
                        {"attention": c["num_hidden_layers"]}, c.get("num_key_value_heads", heads),
                        c.get("head_dim") or c["hidden_size"] // heads,
                        largest_layer=(params - embeddings) // c["num_hidden_layers"])


def _preset_config(preset: str) -> dict:
    from models.presets import PRESETS
    from models.tokenizer import build_tokenizer

    if preset not in PRESETS:
        raise ConfigError(f"model.preset={preset!r} is not a preset; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset](len(build_tokenizer()), {}).to_dict()


def architecture_of(model: ModelConfig) -> Architecture:
    """From `model.path`'s config.json, a known model by folder name, or the tiny `model.preset`."""
    if model.path is None:
        return from_config_dict(f"preset {model.preset}", _preset_config(model.preset))
    path = Path(model.path)
    if (path / "config.json").is_file():
        return from_config_dict(str(path), json.loads((path / "config.json").read_text()))
    for name, config in KNOWN.items():
        if path.name.startswith(name):
            return from_config_dict(f"{path.name} (known config.json; {path} is not on this machine)", config)
    raise ConfigError(f"model.path={model.path}: no config.json there, and not a model whose numbers Estuary "
                      f"knows ({', '.join(KNOWN)}); run the plan where the model is, or copy its config.json")
