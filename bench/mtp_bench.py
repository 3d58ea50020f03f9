"""MTP self-speculative decoding on vs off, on a warm-started policy, at the batch sizes where it should pay.

    .venv/bin/python -m bench.mtp_bench [--preset hybrid-moe-100m] [--batch 1,4] [--draft-steps 2] [--adaptive] [--device cuda]

The policy: the preset, a short SFT on the quick start's four environments' reference
conversations, then MTP heads fitted on its own generations (`warmstart/train_mtp.py`: by
default distilled from the policy's own distributions through both draft steps;
`--fit-objective tokens` fits the sampled tokens' cross-entropy, first step only, as until
session 43). It is
built once and cached under `$ESTUARY_CACHE/bench/` (keyed by the preset, the stages' settings
and the source), about 11 minutes for `hybrid-moe-100m` on 2 cores. A random-init policy would
not do: acceptance on its near-uniform distributions says nothing about a trained one's.

The work: the environments' held-out prompts in turn, one sample each at temperature 1, up to
64 new tokens, stopping at EOS, as rollouts do; `--batch B` runs them B at a time, each chunk of
B to its end (so the batch shrinks as answers finish, as in a round's tail). Drafts on and off use the same
engine code, the same requests and the same seed, timed in turn (off, on, off, on, ...); each
time is the best of three. Decode
tokens/s takes out the prefill (the same prompts with one new token each, which drafting cannot
change: ~0.6 s per prompt for the 100M policy, as long as 20 decode steps); tokens/s with the
prefill is printed beside it. Drafting
is on at every batch size here (`draft_max_batch=0`), K drafts a step: this measures what a draft costs and
buys. `--adaptive` lets the draft governor pick each step's depth, 0 to K, per batch-size bucket
as it measures them (`draft_max_batch=-1`, what rollout engines run): the engine's warm-up
generation and the first timed repeats carry its warm-up.

Why 100M parameters: at batch 1-4 a decode step of ~75M active fp32 parameters streams ~300 MB of
weights from memory, so verifying K+1 tokens in one pass costs little more than one step, as on a GPU; the
tiny presets sit in cache and are dispatch-bound, where a verification costs ~1.5 steps.

Prints a table, then `RESULT mtp_drafts_tok_per_s_b<B> ours=<on> baseline=<off> ratio=<on/off>`,
and acceptance (accepted / drafted) and mean accepted length (tokens per verification) per batch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from bench.draft_round_bench import env_prompts
from bench.timing import add_device, checked_device, tagged
from models.policy import load_policy
from rollout.torch_engine import TorchEngine
from rollout.types import Request, SamplingParams

# The warm start's stages, sized for a 100M policy on 2 cores (~20 s per SFT step of 8 rows).
SFT = {"steps": 30, "batch_size": 8, "lr": 1e-3, "cut_fraction": 0.3}
MTP_FIT = {"samples": 192, "steps": 400, "batch_size": 8, "lr": 2e-3, "max_new_tokens": 64,
           "objective": "distill", "unroll": 2}
NEW_TOKENS = 64
PROMPTS = 16


def _key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sources(*names: str) -> str:
    """A digest of the source files that determine a stage (not of the decode kernels, whose
    edits do not change what SFT or the head fit produce)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for name in names:
        path = root / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.read_bytes())
    return digest.hexdigest()


def warm_policy(preset: str, seed: int = 0, say=print) -> Path:
    """The preset after a short SFT, with MTP heads fitted on its own generations.

    Two cached stages under `$ESTUARY_CACHE/bench/`: the SFT'd policy (~6 min for the 100M
    preset on 2 cores), then the heads (~6 min), each keyed by its settings and its sources.
    """
    from configs import load_config
    from configs.schema import SftConfig
    from estuary.warm_start import cache_root, store_atomically
    from models.mtp import MTP_FILE
    from models.policy import write_preset
    from rollout.worker import budget_range
    from warmstart.sft import run_sft
    from warmstart.train_mtp import train_mtp

    cfg = load_config("tiny_cpu", [])
    root = cache_root().parent / "bench"
    sft_key = _key(preset=preset, seed=seed, sft=SFT, environments=cfg.environments,
                   source=_sources("warmstart/sft.py", "environments", "rewards", "models/presets.py",
                                   "models/tokenizer.py", "models/policy.py"))
    sft_dir = root / f"sft-{preset}-{sft_key}"
    heads_dir = root / f"mtp-{preset}-{_key(sft=sft_key, fit=MTP_FIT, source=_sources('warmstart/train_mtp.py', 'models/mtp.py'))}"
    if (heads_dir / MTP_FILE).is_file():
        say(f"policy: cached warm start {heads_dir}")
        return heads_dir
    if not (sft_dir / "config.json").is_file():
        tmp = root / f"{sft_dir.name}.build"
        shutil.rmtree(tmp, ignore_errors=True)
        write_preset(preset, tmp, seed=seed)
        sft = run_sft(tmp, SftConfig(**SFT), cfg.environments, seed=seed, seed_limit=cfg.eval.seed_offset,
                      budget=budget_range(cfg.rollout.budget), unbudgeted=cfg.rollout.budget.unbudgeted_fraction)
        say(f"sft: {SFT['steps']} steps, loss {sft.loss_start:.2f} -> {sft.loss_end:.2f} in {sft.seconds:.0f}s")
        store_atomically(tmp, sft_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    tmp = root / f"{heads_dir.name}.build"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(sft_dir, tmp)
    env_ids = [(env.id, dict(env.kwargs)) for env in cfg.environments.values()]
    fit = train_mtp(tmp, env_ids=env_ids, seed=seed, **MTP_FIT)
    say(f"mtp heads: loss {fit.loss_start:.2f} -> {fit.loss_end:.2f} in {fit.seconds:.0f}s")
    store_atomically(tmp, heads_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    return heads_dir


def _seconds(engine: TorchEngine, reqs: list[Request], batch: int) -> tuple[float, int]:
    """Generate `batch` requests at a time, each chunk to its end: every prefill then comes before
    its chunk's decoding, so the prefill's time (timed alike with one new token) can be taken out."""
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(reqs), batch):
        out = engine.generate(reqs[i:i + batch])
        tokens += sum(len(s.token_ids) for samples in out for s in samples)
    return time.perf_counter() - start, tokens


def compare(policy, prompts: list[list[int]], batch: int, mtp_steps: int, dtypes: list[str], repeats: int = 3,
            draft_max_batch: int = 0):
    """Drafts off and on (through each of `dtypes`' weights), timed in turn (off, on, off, on,
    ...) so that this machine's drift falls on every mode; the fastest of `repeats` each. Returns
    {mode: (decode tok/s, tok/s with prefill)} and {dtype: its drafting engine} (their counters).

    The prefill is timed as the same prompts with one new token each; drafting cannot change it.
    """
    params = SamplingParams(n=1, max_new_tokens=NEW_TOKENS, temperature=1.0)
    engines = {"off": TorchEngine(policy, max_batch=batch, max_len=1024, seed=0, mtp_steps=0)}
    for dtype in dtypes:
        engines[dtype] = TorchEngine(policy, max_batch=batch, max_len=1024, seed=0, mtp_steps=mtp_steps,
                                     draft_max_batch=draft_max_batch, draft_dtype=dtype)
    best = {mode: [float("inf"), float("inf"), 0] for mode in engines}  # prefill s, total s, tokens
    for engine in engines.values():
        engine.generate([Request(p, params) for p in prompts[:batch]])  # warm-up
        engine.stats = {"drafted": 0, "accepted": 0, "steps": 0}
    for _ in range(repeats):
        for mode, engine in engines.items():
            prefill, _ = _seconds(engine, [Request(p, SamplingParams(n=1, max_new_tokens=1)) for p in prompts], batch)
            total, tokens = _seconds(engine, [Request(p, params) for p in prompts], batch)
            b = best[mode]
            b[0] = min(b[0], prefill)
            if total < b[1]:
                b[1], b[2] = total, tokens
    rates = {mode: ((tokens - len(prompts)) / max(total - prefill, 1e-9), tokens / total)
             for mode, (prefill, total, tokens) in best.items()}
    return rates, {dtype: engines[dtype] for dtype in dtypes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="hybrid-moe-100m")
    parser.add_argument("--policy", default=None, help="a NemotronH directory with mtp.safetensors instead")
    parser.add_argument("--draft-steps", type=int, default=2)
    parser.add_argument("--batch", default="1,4", help="comma-separated batch sizes (at most 8 each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a rollout worker has 1 CPU)")
    parser.add_argument("--fit-objective", default=MTP_FIT["objective"], choices=["distill", "tokens"],
                        help="the heads' fit (warmstart.train_mtp): the policy's distributions, or the sampled tokens")
    parser.add_argument("--fit-unroll", type=int, default=None,
                        help="draft steps the distillation chains (default: --draft-steps)")
    parser.add_argument("--adaptive", action="store_true",
                        help="the draft governor picks each step's depth, 0 to --draft-steps, as it measures "
                             "(model.draft_max_batch=-1, the default in configs) instead of always --draft-steps")
    parser.add_argument("--draft-dtype", default="float32,int8",
                        help="comma-separated weights to draft through (model.draft_dtype), each a mode of its own")
    add_device(parser)
    args = parser.parse_args()
    device = checked_device(parser, args.device)
    batches = [int(b) for b in args.batch.split(",")]
    if any(b < 1 for b in batches):
        parser.error(f"--batch {args.batch}: batch sizes are positive integers")
    dtypes = args.draft_dtype.split(",")
    if not set(dtypes) <= {"float32", "int8"}:
        parser.error(f"--draft-dtype {args.draft_dtype}: choose from float32, int8")
    torch.set_num_threads(args.threads)
    MTP_FIT.update(objective=args.fit_objective, unroll=args.draft_steps if args.fit_unroll is None else args.fit_unroll)
    start = time.perf_counter()
    policy = load_policy(args.policy or warm_policy(args.preset), device=device)
    prompts = env_prompts(policy, PROMPTS)
    params = sum(p.numel() for name, p in policy.model.named_parameters() if not name.startswith("mtp."))
    print(f"policy ready in {time.perf_counter() - start:.0f}s: {params / 1e6:.1f}M parameters; "
          f"{PROMPTS} prompts, up to {NEW_TOKENS} tokens, T=1, "
          f"{'0 to ' if args.adaptive else ''}K={args.draft_steps} drafts, {args.threads} thread(s)")
    print(f"{'batch':<6} {'drafts':<8} {'decode tok/s on':>16} {'off':>7} {'ratio':>6} {'with prefill on':>16} "
          f"{'off':>7} {'ratio':>6} {'acceptance':>11} {'tokens/verify':>14}")
    results = []
    for batch in batches:
        rates, engines = compare(policy, prompts, batch, args.draft_steps, dtypes,
                                 draft_max_batch=-1 if args.adaptive else 0)
        off, off_all = rates["off"]
        for dtype, engine in engines.items():
            on, on_all = rates[dtype]
            s = engine.stats
            acceptance = s["accepted"] / max(1, s["drafted"])
            mean_len = s["accepted"] / max(1, s["steps"]) + 1
            print(f"{batch:<6} {dtype:<8} {on:>16.1f} {off:>7.1f} {on / off:>6.2f} {on_all:>16.1f} {off_all:>7.1f} "
                  f"{on_all / off_all:>6.2f} {acceptance:>11.3f} {mean_len:>14.2f}"
                  + (f"   depth by batch bucket: {engine.governor.chosen()}, verifications by depth: "
                     f"{ {k: s.get(f'steps_k{k}', 0) for k in range(1, args.draft_steps + 1)} }" if args.adaptive else ""))
            tag = "" if dtype == "float32" else f"_{dtype}"
            results += [(f"mtp_drafts{tag}_tok_per_s_b{batch}", f"{on:.1f}", f"{off:.1f}", f"{on / off:.2f}"),
                        (f"mtp_drafts{tag}_with_prefill_tok_per_s_b{batch}", f"{on_all:.1f}", f"{off_all:.1f}",
                         f"{on_all / off_all:.2f}"),
                        (f"mtp{tag}_acceptance_rate_b{batch}", f"{acceptance:.3f}", "0", "nan"),
                        (f"mtp{tag}_mean_accepted_length_b{batch}", f"{mean_len:.2f}", "1", f"{mean_len:.2f}")]
    for name, ours, base, ratio in results:
        print(f"RESULT {tagged(name, device)} ours={ours} baseline={base} ratio={ratio}")


if __name__ == "__main__":
    main()
