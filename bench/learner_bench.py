"""Learner throughput on CPU: trained tokens/s per GRPO step, DeepSpeed ZeRO-2 vs plain torch.

    .venv/bin/python -m bench.learner_bench [--steps 5]

`tiny-hybrid-moe`, 8 groups x 8 samples of 48 prompt+response tokens, packed into 4096-token
micro-batches; the same batches and the same initial weights for both backends. DeepSpeed
runs one process over gloo (its start-up is not timed).

Prints a table, then `RESULT learner_trained_tok_per_s ours=<zero2> baseline=<torch> ratio=<...>`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from learner.batching import pack
from learner.losses import LossConfig
from learner.trainer import Trainer, TrainerOptions
from models.policy import init_policy
from streams.trajectory import POLICY, PROMPT, Trajectory


def synthetic(n: int, prompt_len: int = 16, response_len: int = 32, seed: int = 0) -> list[Trajectory]:
    rng = np.random.default_rng(seed)
    mask = np.array([PROMPT] * prompt_len + [POLICY] * response_len, np.uint8)
    return [Trajectory(token_ids=rng.integers(0, 700, prompt_len + response_len), loss_mask=mask,
                       logprobs=np.where(mask == POLICY, -6.6, 0.0), versions=np.where(mask == POLICY, 0, -1))
            for _ in range(n)]


def rate(backend: str, steps: int) -> float:
    torch.manual_seed(0)
    policy = init_policy("tiny-hybrid-moe", seed=0)
    trainer = Trainer(policy.model, TrainerOptions(backend=backend, zero_stage=2, lr=1e-4))
    samples = synthetic(64)
    adv = list(np.random.default_rng(1).standard_normal(64))
    batches = pack(samples, adv, max_tokens=4096)
    cfg = LossConfig()
    trainer.step(batches, cfg)  # warm-up
    start = time.perf_counter()
    tokens = sum(trainer.step(batches, cfg)["trained_tokens"] for _ in range(steps))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch_rate = rate("torch", args.steps)
    ds_rate = rate("deepspeed", args.steps)
    print(f"{'trained tokens/s (tiny-hybrid-moe)':<36} {'ZeRO-2':>10} {'torch':>10} {'ratio':>7}")
    print(f"{'':<36} {ds_rate:>10.1f} {torch_rate:>10.1f} {ds_rate / torch_rate:>7.2f}")
    print(f"RESULT learner_trained_tok_per_s ours={ds_rate:.1f} baseline={torch_rate:.1f} ratio={ds_rate / torch_rate:.2f}")


if __name__ == "__main__":
    main()
