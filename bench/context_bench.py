"""Hybrid (Mamba-2 + 1 attention layer) vs attention-only decoding at long context.

    .venv/bin/python -m bench.context_bench [--batch 4] [--steps 16]

`tiny-hybrid-dense` vs `tiny-attention` (same parameter count) in Estuary's incremental
decoders at 1k, 8k and 32k tokens of context: decode tokens/s and cache bytes per sequence.
The caches are filled with random values at the given length instead of a real prefill (a 32k
attention prefill would take minutes on 2 cores and decode speed does not depend on the values).

Prints a table, then `RESULT <name> ours=<hybrid> baseline=<attention> ratio=<...>` lines (for
bytes, ratio = attention / hybrid: how many times smaller the hybrid cache is).
"""

from __future__ import annotations

import argparse
import time

import torch

from models.fast_llama import fast_decoder
from models.policy import init_policy


def cache_bytes_per_sequence(state, length: int) -> int:
    total = 0
    for name, t in state.tensors.items():
        per_slot = t[0]
        if name.endswith((".k", ".v")):
            per_slot = per_slot[:length]
        total += per_slot.numel() * per_slot.element_size()
    return total


def decode_rate(preset: str, context: int, batch: int, steps: int) -> tuple[float, int]:
    policy = init_policy(preset, seed=0)
    fast = fast_decoder(policy.model)
    state = fast.new_state(batch, context + steps + 1)
    gen = torch.Generator().manual_seed(0)
    for t in state.tensors.values():
        t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.1)
    state.lengths[:] = context
    slots = torch.arange(batch)
    tokens = torch.randint(0, 700, (batch,), generator=gen)
    fast.decode(state, slots, tokens)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        logits = fast.decode(state, slots, tokens)
        tokens = logits.argmax(-1)
    elapsed = time.perf_counter() - start
    return batch * steps / elapsed, cache_bytes_per_sequence(state, context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    rows = []
    for context, label in ((1024, "1k"), (8192, "8k"), (32768, "32k")):
        h_rate, h_bytes = decode_rate("tiny-hybrid-dense", context, args.batch, args.steps)
        a_rate, a_bytes = decode_rate("tiny-attention", context, args.batch, args.steps)
        rows.append((label, h_rate, a_rate, h_bytes, a_bytes))
    print(f"{'context':<8} {'hybrid tok/s':>13} {'attn tok/s':>11} {'ratio':>6} "
          f"{'hybrid MB/seq':>14} {'attn MB/seq':>12} {'smaller':>8}")
    for label, hr, ar, hb, ab in rows:
        print(f"{label:<8} {hr:>13.1f} {ar:>11.1f} {hr / ar:>6.2f} {hb / 2**20:>14.2f} "
              f"{ab / 2**20:>12.2f} {ab / hb:>7.1f}x")
    for label, hr, ar, hb, ab in rows:
        print(f"RESULT hybrid_vs_attention_decode_tok_per_s_{label} ours={hr:.1f} baseline={ar:.1f} ratio={hr / ar:.2f}")
        print(f"RESULT hybrid_vs_attention_cache_bytes_{label} ours={hb} baseline={ab} ratio={ab / hb:.2f}")


if __name__ == "__main__":
    main()
