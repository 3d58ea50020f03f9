"""Engine factory keyed by the config string `rollout.engine`: `torch` or `vllm`."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any


def make_engine(kind: str, policy_dir: str | Path, dtype: str = "float32", **kwargs: Any):
    """Build an engine serving the policy saved in `policy_dir`."""
    if kind == "torch":
        from models.policy import load_policy
        from rollout.torch_engine import TorchEngine

        return TorchEngine(load_policy(policy_dir, dtype=dtype), **kwargs)
    if kind == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(policy_dir, dtype=dtype, **kwargs)
    close = difflib.get_close_matches(kind, ["torch", "vllm"], n=1)
    hint = f"; did you mean {close[0]!r}" if close else ""
    raise ValueError(f"unknown engine {kind!r}{hint} (choose torch or vllm)")
