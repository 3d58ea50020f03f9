"""The draft governor replayed on measured steps: what choosing a depth costs over the best depth.

    .venv/bin/python -m bench.governor_replay --policy DIR [--batch 1,4] [--record out/steps.json]

Records every decode step's cost (the engine thread's CPU seconds, as the governor is told) and
tokens at each fixed draft depth 0..K, the `bench.mtp_bench` work (the environments' held-out
prompts, 64 tokens at T=1, `--batch` at a time, each chunk to its end), twice over. Then replays
governors on those steps: each step, the governor picks a depth and is told the cost of a step
drawn at random from that depth's records in that batch bucket; a switch off drafting adds one
plain step (it feeds the pending tokens), a switch on emits without a forward pass. 30 replays of
1500 steps per bucket and setting (smoothing, warm-up steps); the first is the engine's default.

Why: a decode step's cost per token is noisy (a drafting step emits 1 to K+1 tokens), and the
governor keeps only an estimate for the depths it is not taking, refreshed when it checks them.
The replay shows what that costs without the hour of bench runs whose drafts-off baselines move
5-10% between them. Prints, per batch bucket, each depth's measured cost over the cheapest, and
`RESULT governor_cost_over_best_<batch>_b<bucket>_<setting> ours=<mean> baseline=1 ratio=<mean>`.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

from rollout.draft_governor import DraftGovernor, bucket

SETTINGS = {"default": {}, "smoothing0.2-warmup4": {"smoothing": 0.2, "warmup": 4}}  # the latter: the first cut (session 44)


def record(policy_dir: str, batch: int, depth: int, repeats: int = 2) -> list[tuple[int, int, float, int]]:
    """(active, depth, CPU seconds, tokens) of every measured step at a fixed depth."""
    import torch

    from bench.draft_round_bench import env_prompts
    from models.policy import load_policy
    from rollout.torch_engine import TorchEngine
    from rollout.types import Request, SamplingParams

    class Fixed:  # the engine's governor interface, one depth always, every step's cost kept
        def __init__(self) -> None:
            self.steps: list = []

        def depth(self, active: int) -> int:
            return depth

        def record(self, active: int, d: int, seconds: float, tokens: int) -> None:
            self.steps.append((active, d, seconds, tokens))

    torch.set_num_threads(1)
    policy = load_policy(policy_dir)
    prompts = env_prompts(policy, 16)
    params = SamplingParams(n=1, max_new_tokens=64, temperature=1.0)
    engine = TorchEngine(policy, max_batch=batch, max_len=1024, seed=0, mtp_steps=max(depth, 1), draft_max_batch=0)
    engine.generate([Request(p, params) for p in prompts[:batch]])  # warm-up
    engine.governor = Fixed()
    for _ in range(repeats):
        for i in range(0, len(prompts), batch):
            engine.generate([Request(p, params) for p in prompts[i:i + batch]])
    return engine.governor.steps


def replay(pool: dict, k: int, governor: DraftGovernor, seed: int, steps: int = 1500) -> float:
    """Seconds per token of `steps` steps in bucket `k` under `governor`."""
    rng, last, seconds, tokens = random.Random(seed), None, 0.0, 0
    plain = sum(s for s, _ in pool[(k, 0)]) / len(pool[(k, 0)])
    for _ in range(steps):
        d = governor.depth(k)
        s, t = rng.choice(pool[(k, d)])
        switched = last is not None and (d > 0) != (last > 0)
        if switched:  # off: one plain step feeds the pending tokens; on: tokens from the logits at hand
            s, t = (s + plain, t) if d == 0 else (0.1 * plain, k)
        else:
            governor.record(k, d, s, t)
        last, seconds, tokens = d, seconds + s, tokens + t
    return seconds / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="a NemotronH directory with mtp.safetensors")
    parser.add_argument("--batch", default="1,4")
    parser.add_argument("--draft-steps", type=int, default=2)
    parser.add_argument("--record", default=None, help="a JSON file to keep the recorded steps in (reused if it exists)")
    args = parser.parse_args()
    path = Path(args.record) if args.record else None
    steps = json.loads(path.read_text()) if path and path.exists() else {}
    for batch in args.batch.split(","):
        if batch not in steps:
            steps[batch] = [row for d in range(args.draft_steps + 1) for row in record(args.policy, int(batch), d)]
    if path:
        path.write_text(json.dumps(steps))
    results = []
    for batch, rows in steps.items():
        pool = defaultdict(list)
        for active, d, s, t in rows:
            pool[(bucket(active), d)].append((s, t))
        for k in sorted({k for k, _ in pool}):
            if any(len(pool[(k, d)]) < 20 for d in range(args.draft_steps + 1)):
                continue  # too few steps at this batch size to replay
            cost = {d: sum(s for s, _ in pool[(k, d)]) / sum(t for _, t in pool[(k, d)])
                    for d in range(args.draft_steps + 1)}
            best = min(cost.values())
            print(f"batch {batch}, bucket {k}: cost per token over the cheapest depth "
                  f"{ {d: round(c / best, 3) for d, c in cost.items()} }")
            for name, setting in SETTINGS.items():
                runs = [replay(pool, k, DraftGovernor(max_depth=args.draft_steps, **setting), seed) / best
                        for seed in range(30)]
                mean = sum(runs) / len(runs)
                print(f"  {name:<22} mean {mean:.3f}  worst {max(runs):.3f}")
                results.append((f"governor_cost_over_best_{batch}_b{k}_{name}", mean))
    for name, mean in results:
        print(f"RESULT {name} ours={mean:.3f} baseline=1 ratio={mean:.3f}")


if __name__ == "__main__":
    main()
