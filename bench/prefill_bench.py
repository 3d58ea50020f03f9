"""Prefill with the LM head on the last position only (what the torch engine samples from)
against the head over every prompt position, in turn.

    .venv/bin/python -m bench.prefill_bench [--models tiny-hybrid-moe,hybrid-moe-100m,vocab131k] [--repeats 30]

`vocab131k` is a NemotronH of width 768 (one block of `bench.broadcast_bench.nemotron`, random
init) with Nemotron 3's 131,072-token vocabulary: our presets' vocabulary is 768, where the head
is a sliver of a prefill. Best of `--repeats` (5 for `vocab131k`) each, the two modes in turn.

Prints `RESULT prefill_s_<model>_T<T> ours=<last-row s> baseline=<every-row s> ratio=<baseline/ours>`.
"""

from __future__ import annotations

import argparse
import time

import torch

from models.fast_llama import fast_decoder


def _model(name: str) -> tuple[torch.nn.Module, int]:
    if name == "vocab131k":
        from bench.broadcast_bench import nemotron

        torch.manual_seed(0)
        return nemotron(768, 1, vocab=131072).eval(), 131072
    from models.policy import init_policy

    policy = init_policy(name, seed=0)
    return policy.model, len(policy.tokenizer)


def measure(name: str, lengths: list[int], repeats: int) -> None:
    model, vocab = _model(name)
    fast = fast_decoder(model)
    repeats = min(repeats, 5) if name == "vocab131k" else repeats
    for length in lengths:
        ids = torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(3))
        state = fast.new_state(1, max(lengths) + 1)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats):
            for last in (False, True):  # in turn: both see the same load
                state.reset(0)
                start = time.perf_counter()
                fast.extend(state, 0, ids, last=last)
                times[last].append(time.perf_counter() - start)
        ours, base = min(times[True]), min(times[False])
        print(f"RESULT prefill_s_{name}_T{length} ours={ours:.5f} baseline={base:.5f} ratio={base / ours:.2f}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-hybrid-moe,hybrid-moe-100m,vocab131k")
    parser.add_argument("--lengths", default="64,200", help="prompt lengths, comma-separated")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    for name in args.models.split(","):
        measure(name, lengths, args.repeats)


if __name__ == "__main__":
    main()
