"""MTP self-speculative decoding on vs off, with heads trained by `estuary model train-mtp`.

    .venv/bin/python -m bench.mtp_bench [--draft-steps 2] [--batch 1,8,64] [--new-tokens 128]

Builds `tiny-hybrid-moe`, fits its MTP heads on its own generations (train-mtp), then generates
the same workload with and without drafts: tokens/s, acceptance rate (accepted / drafted) and
mean tokens per verification step (accepted drafts + 1), at batch 1 (one sequence: where
speculative decoding usually pays most), batch 8 (the tail of a rollout, where few sequences are
still running) and batch 64. Up to 8 samples share a prompt.

Prints a table, then `RESULT <name> ours=<drafts on> baseline=<drafts off> ratio=<on/off>`.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from bench.engine_bench import best_of, prompts
from models.policy import init_policy, load_policy
from rollout.torch_engine import TorchEngine
from rollout.types import Request, SamplingParams
from warmstart.train_mtp import train_mtp


def run(policy, batch: int, new_tokens: int, mtp_steps: int) -> tuple[float, TorchEngine]:
    engine = TorchEngine(policy, max_batch=batch, max_len=256, seed=0, mtp_steps=mtp_steps)
    per_prompt = min(8, batch)
    params = SamplingParams(n=per_prompt, max_new_tokens=new_tokens, ignore_eos=True)
    reqs = [Request(p, params) for p in prompts(policy, max(1, batch // per_prompt))]
    engine.generate(reqs[:1])  # warm-up
    engine.stats = {"drafted": 0, "accepted": 0, "steps": 0}
    return best_of(lambda: engine.generate(reqs)), engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft-steps", type=int, default=2)
    parser.add_argument("--batch", default="1,8,64", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=150)
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    uneven = [b for b in batches if b < 1 or (b > 8 and b % 8)]
    if uneven:  # up to 8 samples share a prompt: other sizes would run fewer sequences than labelled
        parser.error(f"--batch {uneven}: use 1 to 8, or a multiple of 8 (8 samples share each prompt)")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        init_policy("tiny-hybrid-moe", seed=0).save(tmp)
        fit = train_mtp(tmp, samples=128, steps=args.train_steps)
        policy = load_policy(tmp)
    print(f"MTP heads: train-mtp loss {fit.loss_start:.3f} -> {fit.loss_end:.3f} ({fit.seconds:.0f}s)")
    print(f"{'batch':<6} {'tokens/s on':>12} {'tokens/s off':>13} {'ratio':>7} {'acceptance':>11} "
          f"{'tokens/verify':>14}")
    results = []
    for batch in batches:
        off, _ = run(policy, batch, args.new_tokens, 0)
        on, engine = run(policy, batch, args.new_tokens, args.draft_steps)
        s = engine.stats
        acceptance = s["accepted"] / max(1, s["drafted"])
        mean_len = s["accepted"] / max(1, s["steps"]) + 1
        print(f"{batch:<6} {on:>12.1f} {off:>13.1f} {on / off:>7.2f} {acceptance:>11.3f} {mean_len:>14.2f}")
        results += [(f"mtp_drafts_tok_per_s_b{batch}", f"{on:.1f}", f"{off:.1f}", f"{on / off:.2f}"),
                    (f"mtp_acceptance_rate_b{batch}", f"{acceptance:.3f}", "0", "nan"),
                    (f"mtp_mean_accepted_length_b{batch}", f"{mean_len:.2f}", "1", f"{mean_len:.2f}")]
    print(f"(K={args.draft_steps} drafts per verification, {args.new_tokens} new tokens, up to 8 samples per prompt)")
    for name, ours, base, ratio in results:
        print(f"RESULT {name} ours={ours} baseline={base} ratio={ratio}")


if __name__ == "__main__":
    main()
