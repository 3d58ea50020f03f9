"""The Python steps of `scripts/gpu_check.sh`: an NCCL learner step and a collective broadcast into vLLM.

    python scripts/gpu_check.py learner [--cpu]      # ZeRO-3 step, 2 NCCL ranks (1 with one GPU)
    python scripts/gpu_check.py broadcast [--cpu]    # learner -> engine broadcast, served by vLLM

`--cpu` runs the same plumbing without a GPU (gloo ranks; the torch engine stands in for vLLM,
which cannot serve the MoE preset on CPU): what `gpu_check.sh --dry-run` checks here.
Each step prints `RESULT` lines and exits non-zero when its check fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GAP = 5e-2  # most |log-prob| gap between the engine and transformers on the published weights (fp32)


def learner_rank(cpu: bool, steps: int = 3) -> None:
    """One rank (RANK / WORLD_SIZE from the launcher): ZeRO-3 over NCCL on its own GPU (gloo on
    CPU), `steps` steps, the bucketed gather of the full state, the weights moved everywhere."""
    import numpy as np
    import torch

    from bench.learner_bench import synthetic
    from learner.batching import pack
    from learner.losses import LossConfig
    from learner.trainer import Trainer, TrainerOptions
    from models.policy import init_policy

    if not cpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    model = init_policy("tiny-hybrid-moe", seed=0).model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, TrainerOptions(backend="deepspeed", zero_stage=3, lr=1e-3))
    rank, world = trainer.rank, trainer.world_size
    samples, adv = synthetic(64), list(np.random.default_rng(1).standard_normal(64))
    batches = pack(samples[rank::world], adv[rank::world], max_tokens=4096)
    trainer.step(batches, LossConfig())  # warm-up (NCCL communicators, kernels)
    trainer.barrier()
    start = time.perf_counter()
    tokens = sum(trainer.step(batches, LossConfig())["trained_tokens"] for _ in range(steps))
    trainer.barrier()
    elapsed = time.perf_counter() - start
    state = trainer.full_state_dict(bucket_bytes=1 << 20)  # many buckets: the gather path itself
    if rank == 0:
        moved = sum(not torch.equal(state[k].cpu().float(), before[k].float()) for k in before)
        finite = all(torch.isfinite(v.float()).all() for v in state.values())
        print(f"rank0 backend={torch.distributed.get_backend()} world={world} moved={moved} finite={finite} "
              f"tok_per_s={tokens * world / elapsed:.1f}", flush=True)
        if moved < 10 or not finite:
            raise SystemExit("the learner step did not train")


def learner(cpu: bool) -> None:
    """Launch the ranks: two where there are two GPUs, else one (NCCL needs a GPU per rank)."""
    import torch

    from streams.redis_server import free_port

    world = 2 if cpu else min(2, torch.cuda.device_count())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    cmd = [sys.executable, __file__, "learner-rank"] + (["--cpu"] if cpu else [])
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    line = next((ln for ln in logs[0].splitlines() if ln.startswith("rank0 ")), "")
    ok = all(p.returncode == 0 for p in procs) and line
    print(line or logs[0][-3000:])
    rate = float(line.rsplit("tok_per_s=", 1)[1]) if line else 0.0
    kind = "gloo_cpu" if cpu else "nccl"
    print(f"RESULT gpu_check_learner_{kind}_{world}_ranks_tok_per_s ours={rate:.1f} baseline={rate:.1f} ratio=1.00")
    if not ok:
        raise SystemExit(f"the {kind} learner step failed:\n" + "\n".join(log[-2000:] for log in logs))


def _published_weights(policy_dir: Path) -> dict:
    """A version unlike the one the engine starts with: the preset's weights, perturbed."""
    import torch

    from models.policy import load_policy

    g = torch.Generator().manual_seed(1)
    return {k: (v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v).contiguous()
            for k, v in load_policy(policy_dir).model.state_dict().items()}


def broadcast(cpu: bool) -> None:
    """The learner side publishes a new version by collective broadcast; the engine process (vLLM
    on CUDA serving `tiny-hybrid-moe`; the torch engine with `--cpu`) swaps it in and generates;
    its behaviour log-probs must be those of the published weights."""
    import torch

    from models.policy import write_preset
    from weights_sync.collective import CollectiveWeightSync
    from weights_sync.membership import host_rendezvous

    with tempfile.TemporaryDirectory() as tmp:
        policy_dir = write_preset("tiny-hybrid-moe", Path(tmp) / "policy", seed=0)
        _store, address = host_rendezvous("127.0.0.1")
        # NCCL cannot put two ranks on one GPU: with one GPU the group is gloo and the engine on CUDA.
        two_gpus = not cpu and torch.cuda.device_count() >= 2
        engine = subprocess.Popen([sys.executable, __file__, "engine", str(policy_dir), address]
                                  + (["--cpu"] if cpu else []) + (["--nccl"] if two_gpus else []),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if two_gpus:
            torch.cuda.set_device(1)
        publisher = CollectiveWeightSync(address, rank=0, world_size=2, device="cuda" if two_gpus else "cpu",
                                         join_window_s=600)
        start = time.perf_counter()
        publisher.publish(_published_weights(policy_dir), version=1)  # the engine joins first
        print(f"published version 1 over {'nccl' if two_gpus else 'gloo'} in {time.perf_counter() - start:.2f}s "
              "(the engine's start included)", flush=True)
        log = engine.communicate(timeout=900)[0]
        publisher.close()
    print(log[-4000:])
    line = next((ln for ln in log.splitlines() if ln.startswith("served ")), "")
    if engine.returncode != 0 or not line:
        raise SystemExit("the broadcast into the engine failed")
    gap = float(line.rsplit("max_logprob_gap=", 1)[1])
    # lower is better: the tolerance over the gap
    print(f"RESULT gpu_check_broadcast_served_logprob_gap ours={gap:.2e} baseline={GAP:.2e} "
          f"ratio={GAP / max(gap, 1e-12):.2f}")


def engine_process(policy_dir: str, address: str, cpu: bool, nccl: bool) -> None:
    """The engine: joins the group, waits for version 1, loads it, generates, checks log-probs."""
    import torch

    from models.policy import load_policy
    from rollout.engines import make_engine
    from rollout.types import Request, SamplingParams
    from weights_sync.collective import CollectiveWeightSync

    if cpu:
        engine = make_engine("torch", policy_dir, dtype="float32", max_len=512)
    else:  # eager: CUDA graphs would cost a minute of start-up for nothing checked here
        engine = make_engine("vllm", policy_dir, dtype="float32", max_model_len=512, max_num_seqs=16,
                             enforce_eager=True, gpu_memory_utilization=0.3)
    sync = CollectiveWeightSync(address, rank=1, world_size=2, device="cuda" if nccl else "cpu")
    deadline = time.monotonic() + 600
    while (update := sync.pull(newer_than=0)) is None:
        if time.monotonic() > deadline:
            raise SystemExit("no version arrived")
        time.sleep(0.01)
    start = time.perf_counter()
    engine.update_weights(update.weights, update.version)  # vLLM: load_weights in place
    load_s = time.perf_counter() - start
    policy = load_policy(policy_dir)
    policy.model.load_state_dict({k: v.cpu() for k, v in update.weights.items()})
    prompt = policy.tokenizer.apply_chat_template([{"role": "user", "content": "Compute 2 + 3."}],
                                                 add_generation_prompt=True, return_dict=False)
    [samples] = engine.generate([Request(prompt, SamplingParams(n=2, max_new_tokens=16, temperature=1.0))])
    s = samples[0]
    with torch.no_grad():
        logits = policy.model(torch.tensor([prompt + s.token_ids])).logits[0, len(prompt) - 1:-1].float()
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(s.token_ids)[:, None])[:, 0]
    gap = (torch.tensor(s.logprobs) - expected).abs().max().item()
    print(f"served engine={'torch' if cpu else 'vllm'} version={s.versions[-1]} load_s={load_s:.4f} "
          f"max_logprob_gap={gap:.2e}", flush=True)
    sync.close()
    if s.versions[-1] != 1 or gap > GAP:
        raise SystemExit("the engine does not serve the published weights")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["learner", "learner-rank", "broadcast", "engine"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--cpu", action="store_true", help="the plumbing only, without a GPU")
    parser.add_argument("--nccl", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "learner":
        learner(args.cpu)
    elif args.step == "learner-rank":
        learner_rank(args.cpu)
    elif args.step == "broadcast":
        broadcast(args.cpu)
    else:
        engine_process(*args.args, cpu=args.cpu, nccl=args.nccl)


if __name__ == "__main__":
    main()
