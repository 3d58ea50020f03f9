"""Timing helpers shared by the benchmarks (this 2-core machine is noisy: take the best run)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` calls of `fn`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def add_device(parser) -> None:
    """`--device`: where the policy and its engines run (`scripts/gpu_check.sh` passes cuda)."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the policy and engines run (default cpu; cuda: scripts/gpu_check.sh)")


def checked_device(parser, device: str) -> str:
    """`device`, or a clear error where CUDA is asked for and there is none."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine "
                     "(no GPU, or a CPU build of torch); leave --device out to run on the CPU")
    return device


def tagged(name: str, device: str) -> str:
    """A RESULT name, marked with the device where it is not the CPU (the README's figures are CPU's)."""
    return name if device == "cpu" else f"{name}_{device}"
