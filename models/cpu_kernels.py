"""Fused CPU kernels for the fast decoders, built on first use and cached.

On CPU the tiny and small policies decode at batch sizes where each PyTorch op costs more in
dispatch than in arithmetic; a Mamba-2 step is ~35 such ops per layer. `models/csrc/decode_kernels.cpp`
does each of these in one call: `mamba_decode` (conv, state update, gated norm), `attn_decode`
(attention over a slot's KV cache, no gather), `moe_experts` (router top-k and routed experts),
`residual_rms` and `restore_rows` (speculative rollback). The extension is JIT-built with the
system C++ compiler into `TORCH_EXTENSIONS_DIR` (default `~/.cache/estuary/torch_extensions`;
~50 s once per machine, done by scripts/setup.sh). Where no compiler is found, or with
`ESTUARY_CPU_KERNELS=0`, the decoders fall back to the eager path with the same numerics.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from models.extension_build import exclusive_build

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).parent / "csrc" / "decode_kernels.cpp"
_lock = threading.Lock()
_module = None
_failed = False


def enabled() -> bool:
    return os.environ.get("ESTUARY_CPU_KERNELS", "1") != "0"


def kernels():
    """The compiled extension, or None (disabled, or the build failed: logged once)."""
    global _module, _failed
    if not enabled():
        return None
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is None and not _failed:
            try:
                from torch.utils.cpp_extension import load

                isa, flags = _isa()
                name = f"estuary_decode_kernels_{isa}"
                with exclusive_build(name):  # a process killed mid-build must not block the next
                    _module = load(name=name, sources=[str(_SOURCE)],
                                   extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math", *flags],
                                   extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as exc:  # no compiler, no headers: the eager path still works
                _failed = True
                log.warning("fused CPU kernels unavailable (%s); decoding with eager PyTorch ops", exc)
    return _module


def _isa() -> tuple[str, list[str]]:
    """AVX-512 or AVX2/FMA code where this CPU has them (a separate build name, so a home directory shared
    by different machines never loads a build its CPU cannot run), else baseline x86-64/arm."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if {"avx2", "fma", "avx512f"} <= flags:  # 16-wide projections (`small_linear`); the rest as AVX2
        return "avx512", ["-mavx2", "-mfma", "-mavx512f"]
    if {"avx2", "fma"} <= flags:
        return "avx2", ["-mavx2", "-mfma"]
    return "generic", []
