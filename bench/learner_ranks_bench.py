"""Learner throughput with 1 and 2 data-parallel ranks on the same work: trained tokens/s.

    .venv/bin/python -m bench.learner_ranks_bench [--steps 5] [--zero 2] [--threads 2]

`tiny-hybrid-moe`, 8 groups x 8 samples of 48 prompt+response tokens per optimizer step (the
same synthetic samples as `bench.learner_bench`), DeepSpeed over gloo with the same ZeRO stage
both ways and the same CPU threads in total: one rank with `--threads` threads trains all 64
samples per step; two ranks with half the threads each train 32 each (the learner's token
balancing), one optimizer step together. Rank 0 times `--steps` steps after one warm-up step,
between barriers (DeepSpeed's start-up is not timed).

Prints a table, then `RESULT learner_two_ranks_trained_tok_per_s ours=<2 ranks> baseline=<1 rank> ratio=<...>`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from streams.redis_server import free_port


def rank_main(args) -> None:
    """One rank: its share of the step's samples, `--steps` timed steps; rank 0 prints the rate."""
    import numpy as np
    import torch

    from bench.learner_bench import synthetic
    from learner.batching import pack
    from learner.collectives import all_reduce
    from learner.losses import LossConfig
    from learner.trainer import Trainer, TrainerOptions
    from models.policy import init_policy

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    trainer = Trainer(init_policy("tiny-hybrid-moe", seed=0).model,
                      TrainerOptions(backend="deepspeed", zero_stage=args.zero, lr=1e-4))
    rank, world = trainer.rank, trainer.world_size
    samples = synthetic(64)
    advantages = list(np.random.default_rng(1).standard_normal(64))
    batches = pack(samples[rank::world], advantages[rank::world], max_tokens=4096)
    trainer.step(batches, LossConfig())  # warm-up
    trainer.barrier()
    start = time.perf_counter()
    local = sum(trainer.step(batches, LossConfig())["trained_tokens"] for _ in range(args.steps))
    trainer.barrier()
    elapsed = time.perf_counter() - start
    tokens = all_reduce([local], "sum")[0] if world > 1 else local
    if rank == 0:
        print(f"tokens_per_s {tokens / elapsed:.3f}", flush=True)


def run(world: int, args) -> float:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    threads = max(1, args.threads // world)
    procs = [subprocess.Popen([sys.executable, "-m", "bench.learner_ranks_bench", "--rank", str(r),
                               "--steps", str(args.steps), "--zero", str(args.zero), "--threads", str(threads)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("a rank failed:\n" + "\n".join(log[-2000:] for log in logs))
    return float(next(line.split()[1] for line in logs[0].splitlines() if line.startswith("tokens_per_s")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in total, split over the ranks")
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        return rank_main(args)
    one, two = run(1, args), run(2, args)
    print(f"{'trained tokens/s (tiny-hybrid-moe, ZeRO-' + str(args.zero) + ')':<44} {'2 ranks':>9} {'1 rank':>9} "
          f"{'ratio':>6}")
    print(f"{'':<44} {two:>9.1f} {one:>9.1f} {two / one:>6.2f}")
    print(f"RESULT learner_two_ranks_trained_tok_per_s ours={two:.1f} baseline={one:.1f} ratio={two / one:.2f}")


if __name__ == "__main__":
    main()
