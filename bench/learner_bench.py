"""Learner throughput on CPU: trained tokens/s per GRPO step.

    .venv/bin/python -m bench.learner_bench [--steps 5]

1. DeepSpeed ZeRO-2 vs plain torch: `tiny-hybrid-moe`, 8 groups x 8 samples of 48
   prompt+response tokens, packed into 4096-token micro-batches; the same batches and the same
   initial weights for both backends. DeepSpeed runs one process over gloo (its start-up is not
   timed). `RESULT learner_trained_tok_per_s ours=<zero2> baseline=<torch>`.
2. Each group's prompt run once (`learner.share_prompt`) vs every row whole: the demo's learner
   (ZeRO-2, `tiny-hybrid-moe-2attn` with MTP heads, the KL reference) on 8 groups x 8 samples
   shaped like the quick start's four environments (prompt and response lengths measured on its
   warm start's groups). `RESULT learner_shared_prompt_tok_per_s ours=<shared> baseline=<rows>`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from learner.batching import pack, pack_groups
from learner.losses import LossConfig
from learner.objective import Objective
from learner.trainer import Trainer, TrainerOptions
from models.mtp import add_mtp_heads
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


# (prompt tokens, response tokens) per sample, from the quick start's warm-start groups: a group
# as rows cost 799 / 1046 / 1985 / 2792 tokens, with the prompt once 237 / 379 / 914 / 609.
DEMO_SHAPES = {"math": (80, 20), "code": (95, 35), "tool_use": (153, 95), "long_context": (312, 37)}


def demo_groups(seed: int = 0) -> list[tuple[list[Trajectory], list[float]]]:
    """Two groups of 8 per environment shape, each sharing its prompt; responses vary by +-50%."""
    rng = np.random.default_rng(seed)
    groups = []
    for prompt_len, response_len in DEMO_SHAPES.values():
        for _ in range(2):
            prompt = list(rng.integers(0, 700, prompt_len))
            samples = []
            for _ in range(8):
                n = int(rng.integers(response_len // 2, response_len * 3 // 2 + 1))
                mask = np.array([PROMPT] * prompt_len + [POLICY] * n, np.uint8)
                samples.append(Trajectory(np.array(prompt + list(rng.integers(0, 700, n))), mask,
                                          np.where(mask == POLICY, -6.6, 0.0), np.where(mask == POLICY, 0, -1)))
            groups.append((samples, list(rng.standard_normal(8))))
    return groups


def shared_rate(share: bool, steps: int) -> float:
    torch.manual_seed(0)
    policy = init_policy("tiny-hybrid-moe-2attn", seed=0)
    add_mtp_heads(policy.model, seed=0)
    trainer = Trainer(policy.model, TrainerOptions(backend="deepspeed", zero_stage=2, lr=1e-4, keep_reference=True))
    batches = pack_groups(demo_groups(), max_tokens=4096, share_prompt=share)
    objective = Objective(loss=LossConfig(kl_coef=0.1), mtp_coef=0.1)
    trainer.step(batches, objective)  # warm-up
    start = time.perf_counter()
    tokens = sum(trainer.step(batches, objective)["trained_tokens"] for _ in range(steps))
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
    rows = max(shared_rate(False, args.steps), shared_rate(False, args.steps))
    shared = max(shared_rate(True, args.steps), shared_rate(True, args.steps))
    print(f"{'trained tokens/s (demo learner)':<36} {'shared':>10} {'rows':>10} {'ratio':>7}")
    print(f"{'':<36} {shared:>10.1f} {rows:>10.1f} {shared / rows:>7.2f}")
    print(f"RESULT learner_shared_prompt_tok_per_s ours={shared:.1f} baseline={rows:.1f} ratio={shared / rows:.2f}")


if __name__ == "__main__":
    main()
