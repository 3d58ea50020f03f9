"""Adaptive MTP drafting on a rollout round: drafts off vs on at every batch vs adaptive.

    .venv/bin/python -m bench.draft_round_bench [--policy DIR] [--draft-steps 2] [--repeats 18] [--draft-dtype int8]
        [--rounds tail,even,tail1] [--device cuda]

A round is what a rollout worker's engine serves: groups of 8 samples of a prompt (the quick
start's four environments in turn, held-out seeds), continuously batched. Rounds (`--rounds`;
tail and even by default), each timed with the same requests in three modes:
- `tail`: 32 sequences, 28 of them stop after 16 tokens and 4 run to 256 (a long tail: most of
  the round's wall time is a few sequences running alone, where speculation should pay);
- `even`: 32 sequences of 64 tokens (no tail: drafting mostly runs at full batch);
- `tail1` (`--rounds tail1`): 31 stop after 16 tokens and one runs to 256. On this CPU a
  verification of 4 sequences is 8-12 rows per weight, past where its projections stop being
  memory-bound (~6 rows; a GPU's balance point is hundreds), so `tail`'s batch-4 tail is not the
  regime a GPU's tail is in; one long sequence is.
Modes, timed in turn (each repeat in the next of the six orders, so no mode always follows
another): `off` (no drafts), `always` (`model.draft_max_batch=0`: K drafts every step) and
`adaptive` (-1: each step drafts 0 to K tokens, the depth the engine measures cheapest for the
active batch's size as it runs; one untimed round first, as a rollout worker's engine has
served many before). The table shows the depth it chose per batch bucket.

The policy is the quick start's warm start (`configs/tiny_cpu.yaml`: copy pretraining, SFT and
MTP heads fitted on its own generations; built once, then cached), so acceptance is that of a
trained policy's heads, not of a random one's near-uniform distributions. `--policy` takes any
NemotronH directory with `mtp.safetensors`.

Prints a table, then `RESULT draft_adaptive_round_s_<round> ours=<adaptive> baseline=<off>`
(best of the repeats; ratio off/adaptive: above 1, adaptive takes less wall time), the same for
`always`, and `..._mean` lines over all the timed rounds: the governor checks the depths it is not
taking every few hundred steps of a bucket (up to 1024), so a check falls in one round of several,
which a best of the repeats leaves out and the mean pays for; the table shows the verifications
the adaptive engine ran per depth in the timed rounds. The even round is 64 steps at batch 32: at
the default 18 repeats its timed rounds cover one period of a check that never pays.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch

from bench.timing import add_device, checked_device, tagged
from models.policy import load_policy
from rollout.torch_engine import TorchEngine
from rollout.types import Request, SamplingParams

# (tokens, sequences) per round; `tail1` only when asked for (--rounds)
ROUNDS = {"tail": [(16, 28), (256, 4)], "even": [(64, 32)], "tail1": [(16, 31), (256, 1)]}


def env_prompts(policy, count: int) -> list[list[int]]:
    """Prompts of the quick start's four environments in turn (held-out seeds): what its engines serve."""
    from configs import load_config
    from environments import env_factory

    makers = [env_factory(e) for e in load_config("tiny_cpu", []).environments.values()]
    out = []
    for i in range(count):
        messages, _ = makers[i % len(makers)]().reset(seed=10**6 + i)
        out.append(policy.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    return out


def requests(policy, shape: list[tuple[int, int]]) -> list[Request]:
    groups = [(tokens, min(8, sequences - j)) for tokens, sequences in shape for j in range(0, sequences, 8)]
    prompts = env_prompts(policy, len(groups))
    return [Request(p, SamplingParams(n=n, max_new_tokens=tokens, ignore_eos=True))
            for p, (tokens, n) in zip(prompts, groups, strict=True)]


def round_seconds(policy, shape, mtp_steps: int, repeats: int,
                  draft_dtype: str = "float32") -> dict[str, tuple[float, float, TorchEngine]]:
    """(best, mean) wall time of one round over `repeats` per mode (off, always, adaptive), after
    one untimed round on each engine. The modes are timed in turn, each repeat in the next of the
    six orders: timed one after the other, this machine's drift fell on one mode (session 44: an
    adaptive engine that never drafted read 2-5% slower than drafts off; in turn, the same two
    engines gave 0.224 and 0.227 s)."""
    modes = {"off": (0, 0), "always": (mtp_steps, 0), "adaptive": (mtp_steps, -1)}
    engines = {mode: TorchEngine(policy, max_batch=64, max_len=1024, seed=0, mtp_steps=k, draft_max_batch=dmb,
                                 draft_dtype=draft_dtype if k else "float32")
               for mode, (k, dmb) in modes.items()}
    for engine in engines.values():
        engine.generate(requests(policy, shape))
        engine.stats = {"drafted": 0, "accepted": 0, "steps": 0}
    seconds: dict[str, list[float]] = {mode: [] for mode in engines}
    orders = list(itertools.permutations(engines))
    for r in range(repeats):
        for mode in orders[r % len(orders)]:
            start = time.perf_counter()
            engines[mode].generate(requests(policy, shape))
            seconds[mode].append(time.perf_counter() - start)
    return {mode: (min(s), sum(s) / len(s), engines[mode]) for mode, s in seconds.items()}


def warm_start_policy(out: Path) -> Path:
    from configs import load_config
    from estuary.warm_start import warm_start

    return warm_start(load_config("tiny_cpu", [f"run.output_dir={out}"]), out / "policy", print)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=None, help="NemotronH directory with MTP heads (default: the demo's warm start)")
    parser.add_argument("--draft-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=18, help="timed rounds per mode")
    parser.add_argument("--rounds", default="tail,even", help=f"comma-separated, of {', '.join(ROUNDS)}")
    parser.add_argument("--draft-dtype", default="float32", choices=["float32", "int8"],
                        help="weights the drafts go through (model.draft_dtype)")
    add_device(parser)
    args = parser.parse_args()
    device = checked_device(parser, args.device)
    rounds = args.rounds.split(",")
    if not set(rounds) <= set(ROUNDS):
        parser.error(f"--rounds {args.rounds}: choose from {', '.join(ROUNDS)}")
    torch.set_num_threads(1)  # as a rollout worker runs (rollout.cpus_per_worker: 1)
    with tempfile.TemporaryDirectory() as tmp:
        policy = load_policy(args.policy or warm_start_policy(Path(tmp)), device=device)
    results = []
    print(f"{'round':<6} {'off s':>8} {'always s':>9} {'adaptive s':>11} {'(means)':>22} {'crossover':>10} "
          f"{'acceptance':>11}  depth by batch bucket")
    for name in rounds:
        shape = ROUNDS[name]
        timed = round_seconds(policy, shape, args.draft_steps, args.repeats, args.draft_dtype)
        (off, off_m, _), (always, always_m, eng_always), (adaptive, adaptive_m, engine) = (
            timed["off"], timed["always"], timed["adaptive"])
        acceptance = eng_always.stats["accepted"] / max(1, eng_always.stats["drafted"])
        means = f"{off_m:.3f}/{always_m:.3f}/{adaptive_m:.3f}"
        verified = {int(key[7:]): n for key, n in sorted(engine.stats.items()) if key.startswith("steps_k")}
        print(f"{name:<6} {off:>8.3f} {always:>9.3f} {adaptive:>11.3f} {means:>22} {engine.governor.crossover():>10} "
              f"{acceptance:>11.3f}  {engine.governor.chosen()}, verifications by depth {verified}")
        results += [(f"draft_adaptive_round_s_{name}", adaptive, off), (f"draft_always_round_s_{name}", always, off),
                    (f"draft_adaptive_round_s_{name}_mean", adaptive_m, off_m),
                    (f"draft_always_round_s_{name}_mean", always_m, off_m)]
    for label, ours, base in results:
        print(f"RESULT {tagged(label, device)} ours={ours:.3f} baseline={base:.3f} ratio={base / ours:.3f}")


if __name__ == "__main__":
    main()
