"""What data-parallel learner ranks say to each other beside DeepSpeed's gradients.

    total, = all_reduce([local_tokens], "sum")          # control values, any backend
    mine = scatter_from_rank0(shares)                   # rank 0 hands each rank its share
    everyone = gather_to_all(stats)                     # small Python objects from every rank

Control traffic goes over a gloo group of its own (CPU tensors, float64 and Python objects are
fine there), so nothing here depends on NCCL, which rejects CPU and float64 tensors; it is
created once, collectively, when the trainer joins the process group.
"""

from __future__ import annotations

import torch

_CONTROL = None


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def control_group():
    """The gloo group for control values (a collective call the first time, on every rank)."""
    global _CONTROL
    import torch.distributed as dist

    if _CONTROL is None:
        _CONTROL = dist.new_group(backend="gloo")
    return _CONTROL


def all_reduce(values: list[float], op: str) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=control_group())
    return t.tolist()


def scatter_from_rank0(shares: list | None):
    """Rank 0 passes one object per rank (or None: nobody gets anything this time); every rank
    returns its own share, or None on all ranks."""
    import torch.distributed as dist

    rank, size = world()
    flag = [shares is not None] if rank == 0 else [None]
    dist.broadcast_object_list(flag, src=0, group=control_group())
    if not flag[0]:
        return None
    out = [None]
    dist.scatter_object_list(out, shares if rank == 0 else None, src=0, group=control_group())
    return out[0]


def gather_to_all(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    import torch.distributed as dist

    out = [None] * world()[1]
    dist.all_gather_object(out, obj, group=control_group())
    return out
