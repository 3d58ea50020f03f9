"""Collective weight broadcast: publish-to-received latency vs model size, against a raw
`torch.distributed.broadcast` of the same bytes.

    .venv/bin/python -m bench.broadcast_bench [--sizes tiny,tiny-separate,100m,500m] [--repeats 3]

Two processes on this machine over gloo (loopback TCP): this one publishes, a child process is
the engine. Models are NemotronH with random init: `tiny-hybrid-moe`, ~100M and ~500M
parameters, float32. The weights are published as the learner holds them: the state dict of
the learner's own `Trainer` (DeepSpeed ZeRO-2, the default backend, which keeps the parameters
in flat buffers). `<size>-separate` publishes a plain module's state dict instead (a tensor
each, as the `torch` backend holds them), which the transport has to pack.
- ours: `CollectiveWeightSync.publish(state_dict, v)` (buckets of at most 64 MiB, sent from
  where they lie or packed, the engine receiving straight into the new version's own tensors)
  until the engine has swapped version v in and said so through the store;
- baseline: one `broadcast` of a preallocated flat buffer of the same bytes into a preallocated
  buffer on the engine (nothing packed, unpacked or allocated), until the engine says so the same way.
Best of `--repeats` runs each (more for a small model), taken in turn, after one warm-up each. Also timed: packing the state dict into one
preallocated buffer (one copy of the same bytes, as the publisher packs a bucket before sending
it). A bucket cannot go on the wire before it is packed, so for a model of one bucket
raw / (raw + pack) bounds the ratio any packing transport reaches.

Prints a table, then `RESULT weight_broadcast_latency_s_<size> ours=<s> baseline=<s> ratio=<baseline/ours>`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from bench.timing import best_time
from weights_sync.collective import CollectiveWeightSync
from weights_sync.membership import connect, host_rendezvous


def nemotron(hidden: int, blocks: int, vocab: int = 32768) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, NemotronHConfig

    heads = hidden // 64
    cfg = NemotronHConfig(
        vocab_size=vocab, hidden_size=hidden, layers_block_type=NemotronHConfig._pattern_to_list("M-M*ME" * blocks),
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=64,
        intermediate_size=hidden * 8 // 3, mamba_num_heads=2 * heads, mamba_head_dim=64, n_groups=4,
        ssm_state_size=64, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=hidden,
        moe_shared_expert_intermediate_size=2 * hidden, moe_latent_size=hidden // 2, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg)


def model(size: str) -> torch.nn.Module:
    if size == "tiny":
        from models.policy import init_policy

        return init_policy("tiny-hybrid-moe").model
    return {"100m": lambda: nemotron(768, 2), "500m": lambda: nemotron(1536, 4)}[size]()


def publishable(size: str) -> tuple[dict[str, torch.Tensor], object]:
    """The state dict to publish, and what keeps its memory alive (the learner's trainer)."""
    module = model(size.removesuffix("-separate"))
    if size.endswith("-separate"):
        return {k: v.detach().contiguous() for k, v in module.state_dict().items()}, module
    from learner.trainer import Trainer, TrainerOptions

    trainer = Trainer(module, TrainerOptions(backend="deepspeed", zero_stage=2))
    return {k: v.detach() for k, v in trainer.full_state_dict().items()}, trainer


def _wait(store, key: str, timeout_s: float = 600.0) -> None:
    # the store tells a waiting client the moment the key is set: a poll with a sleep between
    # looks (~0.3 ms on this machine) would add up to one interval to a 1 ms publication, to ours
    # or to the baseline's depending on when its ack lands
    store.wait([key], timedelta(seconds=timeout_s))


def engine(address: str) -> None:
    """The child: an engine of the collective group, and the receiving end of the raw broadcasts."""
    acks, control = connect(address, 60), connect(address, 60)
    sync = CollectiveWeightSync(address, rank=1, world_size=2)
    sync.subscribe(lambda u: acks.set(f"bench/ack-{u.version}", "1"))  # the receiver thread's own client
    phase = 0
    while not control.check(["bench/done"]):
        if not control.check([f"bench/raw-{phase}"]):
            time.sleep(0.01)
            continue
        nbytes, runs = (int(x) for x in control.get(f"bench/raw-{phase}").split())
        group = dist.ProcessGroupGloo(dist.PrefixStore(f"bench/raw{phase}/", control), 1, 2, timedelta(seconds=600))
        flat = torch.empty(nbytes, dtype=torch.uint8)
        for run in range(runs):
            group.broadcast(flat, 0).wait()
            control.set(f"bench/raw-ack-{phase}-{run}", "1")
        del group, flat
        phase += 1
    sync.close()


def pack_time(weights: dict[str, torch.Tensor], repeats: int) -> float:
    """One copy of every tensor into a preallocated flat buffer (all float32 here)."""
    flat = torch.empty(sum(t.numel() for t in weights.values()))
    tensors = [t.reshape(-1) for t in weights.values()]
    return best_time(lambda: torch.cat(tensors, out=flat), repeats + 1)


def measure(size: str, phase: int, publisher: CollectiveWeightSync, control, repeats: int,
            version: list[int]) -> tuple[int, int, float, float, float]:
    weights, _holder = publishable(size)
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    # a few milliseconds move by 2x from run to run here: a small model gets more runs (~0.8 GB each)
    repeats = max(repeats, min(200, (800 << 20) // nbytes))
    pack = pack_time(weights, repeats)
    control.set(f"bench/raw-{phase}", f"{nbytes} {repeats + 1}")
    group = dist.ProcessGroupGloo(dist.PrefixStore(f"bench/raw{phase}/", control), 0, 2, timedelta(seconds=600))
    flat, run = torch.ones(nbytes, dtype=torch.uint8), [0]

    def ours():
        version[0] += 1
        publisher.publish(weights, version[0])
        _wait(control, f"bench/ack-{version[0]}")

    def raw():
        group.broadcast(flat, 0).wait()
        _wait(control, f"bench/raw-ack-{phase}-{run[0]}")
        run[0] += 1

    ours()  # warm-ups (the first publication also forms the group)
    raw()
    o, r = [], []
    for _ in range(repeats):  # in turn, so both see the same load
        o.append(best_time(ours, 1))
        r.append(best_time(raw, 1))
    return sum(t.numel() for t in weights.values()), nbytes, min(o), min(r), pack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,tiny-separate,100m,500m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # the child process: the rendezvous address
    args = parser.parse_args()
    if args.engine:
        return engine(args.engine)
    _store, address = host_rendezvous("127.0.0.1")
    child = subprocess.Popen([sys.executable, "-m", "bench.broadcast_bench", "--engine", address])
    control = connect(address, 60)
    publisher = CollectiveWeightSync(address, rank=0, world_size=2, join_window_s=120)
    rows, version = [], [0]
    try:
        for phase, size in enumerate(args.sizes.split(",")):
            rows.append((size, *measure(size, phase, publisher, control, args.repeats, version)))
    finally:
        control.set("bench/done", "1")
        child.wait(timeout=120)
        publisher.close()
    print(f"{'model':<6} {'params':>13} {'MiB':>8} {'ours s':>9} {'raw bcast s':>12} {'ratio':>6} "
          f"{'pack s':>9} {'raw/(raw+pack)':>15}")
    for size, n, nbytes, o, r, pack in rows:
        print(f"{size:<6} {n:>13,} {nbytes / 2**20:>8.0f} {o:>9.4f} {r:>12.4f} {r / o:>6.2f} "
              f"{pack:>9.4f} {r / (r + pack):>15.2f}")
    for size, _n, _b, o, r, _p in rows:
        print(f"RESULT weight_broadcast_latency_s_{size} ours={o:.6f} baseline={r:.6f} ratio={r / o:.2f}")


if __name__ == "__main__":
    main()
