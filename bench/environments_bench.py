"""Environment-layer benchmarks: sandbox throughput and long-context generation time.

    .venv/bin/python -m bench.environments_bench [--executions 200]

1. Sandbox executions/s of a trivial passing program through `SandboxPool(max_parallel=2)`
   (process group, rlimits, namespaces, uid switch, folder set-up and clean-up included), against
   bare `python -c` launches of the same program, two at a time.
2. Long-context instance generation (reset of `estuary/long_context`) at 32k, 128k and 1M tokens,
   against a straightforward generator that appends one random sentence at a time.

Prints a table, then `RESULT <name> ours=<v> baseline=<v> ratio=<ours/baseline>` lines (for
times, ratio = baseline/ours: above 1 means Estuary is faster).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import environments
from bench.timing import best_time
from environments.long_context import _FILLER
from environments.sandbox import Limits, SandboxPool

PROGRAM = "assert sum(range(10)) == 45\nprint('ok')"


def sandbox_rate(n: int) -> float:
    pool = SandboxPool(max_parallel=2)
    limits = Limits(wall_s=10)
    pool.run(PROGRAM, limits)  # warm the page cache
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda _: pool.run(PROGRAM, limits), range(n)))
    elapsed = time.perf_counter() - start
    assert all(r.verdict == "ok" for r in results), results[0]
    return n / elapsed


def bare_rate(n: int) -> float:
    def launch(_):
        subprocess.run([sys.executable, "-c", PROGRAM], check=True, capture_output=True)

    launch(0)
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(launch, range(n)))
    return n / (time.perf_counter() - start)


def naive_haystack(seed: int, n_chars: int) -> str:
    rng, text = random.Random(seed), ""
    while len(text) < n_chars:
        text += rng.choice(_FILLER) + " "
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executions", type=int, default=200)
    args = parser.parse_args()

    ours_rate, base_rate = sandbox_rate(args.executions), bare_rate(args.executions)
    rows = [("sandbox executions/s (pool of 2)", ours_rate, base_rate, ours_rate / base_rate)]
    for tokens, label in ((32_000, "32k"), (128_000, "128k"), (1_000_000, "1M")):
        env = environments.make("estuary/long_context", length_tokens=tokens, task="niah_single")
        ours = best_time(lambda env=env: env.reset(seed=1))
        base = best_time(lambda tokens=tokens: naive_haystack(1, tokens * 4))
        rows.append((f"long_context {label} generation s", ours, base, base / ours))

    print(f"{'measure':<36} {'estuary':>12} {'baseline':>12} {'ratio':>8}")
    for name, ours, base, ratio in rows:
        print(f"{name:<36} {ours:>12.4f} {base:>12.4f} {ratio:>8.2f}")
    names = ["sandbox_exec_per_s", "long_context_32k_s", "long_context_128k_s", "long_context_1m_s"]
    for key, (_, ours, base, ratio) in zip(names, rows, strict=True):
        print(f"RESULT {key} ours={ours:.4f} baseline={base:.4f} ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
