"""Policies are HF causal-LM directories: load one, build a tiny preset, save it back.

    policy = init_policy("tiny-hybrid-moe", seed=0)      # random init, no download
    policy.save("out/")                                   # config.json + safetensors + tokenizer
    policy = load_policy("out/")                          # or any HF causal-LM directory

A saved policy loads with `transformers.AutoModelForCausalLM.from_pretrained(dir)`.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from models.mamba_chunked import install_fast_mamba
from models.mtp import load_mtp_heads, save_mtp_heads
from models.presets import PRESETS
from models.tokenizer import build_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PolicyError(ValueError):
    """A policy directory or preset name is wrong; the message says what to pass instead."""


@dataclass
class Policy:
    """A causal LM and its tokenizer: what engines generate with and learners train."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    def save(self, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write config.json, model.safetensors and the tokenizer files to `out_dir`.

        `state`: the full weights when the live module holds only a shard (ZeRO-3).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        full = self.model.state_dict() if state is None else state
        # MTP heads go to their own file (vLLM's `mtp.*` layout), so plain transformers, which
        # reads model.safetensors, never sees keys it does not know.
        trunk = {k: v for k, v in full.items() if not k.startswith("mtp.")}
        self.model.save_pretrained(out, state_dict=trunk)
        if getattr(self.model, "mtp", None) is not None:
            save_mtp_heads(self.model, out, {k[4:]: v for k, v in full.items() if k.startswith("mtp.")})
        self.tokenizer.save_pretrained(out)
        return out


def _quiet_kernel_fallback_warnings() -> None:
    # On CPU, transformers' NemotronH uses its reference PyTorch Mamba kernels (correct, and the
    # only ones that run here); it says so once per kernel. That is expected, not actionable.
    logging.getLogger("transformers.integrations.hub_kernels").setLevel(logging.ERROR)


def _fast_paths(model) -> None:
    # Without the mamba-ssm package transformers runs Mamba-2 through its torch reference; ours
    # (`models/mamba_chunked.py`) gives the same values and gradients, a layer's forward and
    # backward 1.4-1.6x faster on CPU. Where mamba-ssm is installed (GPUs), its kernels stay.
    if importlib.util.find_spec("mamba_ssm") is None:
        install_fast_mamba(model)


def init_policy(preset: str, seed: int = 0, dtype: str = "float32") -> Policy:
    """Build a tiny preset with random weights (seeded) and the offline tokenizer."""
    if preset not in PRESETS:
        raise PolicyError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    _quiet_kernel_fallback_warnings()
    tokenizer = build_tokenizer()
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config = PRESETS[preset](len(tokenizer), special)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    _fast_paths(model)
    model.eval()
    return Policy(model=model, tokenizer=tokenizer)


def load_policy(path: str | Path, dtype: str = "float32", device: str | torch.device = "cpu") -> Policy:
    """Load an HF causal-LM directory (config.json + safetensors + tokenizer files)."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise PolicyError(
            f"{root} is not a policy directory (no config.json); "
            f"create one with `estuary model init PRESET {root}`"
        )
    _quiet_kernel_fallback_warnings()
    model = AutoModelForCausalLM.from_pretrained(root, dtype=DTYPES[dtype]).to(device)
    load_mtp_heads(model, root)
    _fast_paths(model)
    tokenizer = AutoTokenizer.from_pretrained(root)
    model.eval()
    return Policy(model=model, tokenizer=tokenizer)


def write_preset(preset: str, out_dir: str | Path, seed: int = 0) -> Path:
    """`estuary model init`: build a preset and save it as an HF directory."""
    return init_policy(preset, seed=seed).save(out_dir)
