"""How a state dict travels in the collective transport (`weights_sync.collective`): the bucket
layout both sides agree on, the publisher's packing and the engine's receive buffers.

    layout = bucket_layout(state_dict, bucket_bytes=64 << 20)   # publisher, once per new layout
    flat = pack(buffer, layout[i], state_dict, head=(version, layout_id, stride))  # a packed bucket
    tensors = unpack(buffer, layout[i])                          # engine: views, nothing copied

A bucket is one broadcast. A run of tensors that lie end to end in memory (DeepSpeed's ZeRO-1/2
keep a model's parameters in flat buffers: the tiny preset's 49 trainable tensors fill one) goes
from where it lies, in buckets of its own dtype (`lies`). The other tensors are packed as bytes,
one aligned region per dtype, into `uint8` buckets; the first opens with a 24-byte header
(version, layout id, stride), so a publication on CPU is its data buckets and nothing else. The
lying buckets go first: the publisher packs the others while they are on the wire. A header with
a stride > 0 is a promise (`weights_sync.collective`): the generation's later publications are
their lying buckets alone, each version `stride` after the last, the packed tensors unchanged.
"""

from __future__ import annotations

import torch

HEADER_BYTES = 24  # three int64s: version, layout id, stride promised (0: none)
ALIGN = 16  # a packed region starts at a multiple of this many bytes (complex128 is 16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def runs(weights: dict[str, torch.Tensor]) -> list[list[str]]:
    """The state dict's names in runs of tensors of one dtype that lie end to end in one storage,
    each in memory order (DeepSpeed's flat buffers hold a model's parameters in an order of their
    own, with frozen ones elsewhere); runs in the order the state dict first names them."""
    regions: dict[tuple, list[tuple[int, int, str]]] = {}
    for name, t in weights.items():
        key = (t.untyped_storage().data_ptr(), t.dtype, t.device) if t.is_contiguous() else (name,)
        regions.setdefault(key, []).append((t.data_ptr(), _nbytes(t), name))
    out: list[list[str]] = []
    for region in regions.values():
        region.sort()
        for i, (start, _size, name) in enumerate(region):
            if i and region[i - 1][0] + region[i - 1][1] == start:
                out[-1].append(name)
            else:
                out.append([name])
    order = {name: i for i, name in enumerate(weights)}
    return sorted(out, key=lambda run: min(order[n] for n in run))


def bucket_layout(weights: dict[str, torch.Tensor], bucket_bytes: int, lie_bytes: int = 64 << 10) -> list[dict]:
    """The state dict as buckets: [{"dtype", "n", "lies", "regions": [{"dtype", "start", "n",
    "tensors": [[name, shape, start, n], ...]}, ...]}, ...]. A bucket's `n` counts its dtype's
    elements (bytes for a packed one); a region's `start` is a byte offset, its tensors' in
    elements. Packed buckets come last, the first of them with the header; each holds at most
    `bucket_bytes`. A run of several tensors of at least `lie_bytes`, or a tensor bigger than
    `bucket_bytes`, lies: buckets of its own, at most `bucket_bytes` unless one tensor is bigger."""
    packed: dict[torch.dtype, list[str]] = {}
    lying: list[dict] = []
    for run in runs(weights):
        size = sum(_nbytes(weights[n]) for n in run)
        if (len(run) > 1 and size >= lie_bytes) or size > bucket_bytes:
            lying.extend(_lying_buckets(weights, run, bucket_bytes))
        else:
            for name in run:
                packed.setdefault(weights[name].dtype, []).append(name)
    # lying buckets first: the publisher packs the rest while they are on the wire
    return lying + _packed_buckets(weights, packed, bucket_bytes)


def _lying_buckets(weights: dict[str, torch.Tensor], run: list[str], bucket_bytes: int) -> list[dict]:
    buckets: list[dict] = []
    for name in run:
        t = weights[name]
        bucket = buckets[-1] if buckets else None
        if bucket is None or (bucket["n"] + t.numel()) * t.element_size() > bucket_bytes:
            dtype = _dtype_name(t.dtype)
            bucket = {"dtype": dtype, "n": 0, "lies": True,
                      "regions": [{"dtype": dtype, "start": 0, "n": 0, "tensors": []}]}
            buckets.append(bucket)
        region = bucket["regions"][0]
        region["tensors"].append([name, list(t.shape), bucket["n"], t.numel()])
        bucket["n"] = region["n"] = bucket["n"] + t.numel()
    return buckets


def _packed_buckets(weights: dict[str, torch.Tensor], by_dtype: dict[torch.dtype, list[str]],
                    bucket_bytes: int) -> list[dict]:
    bucket = {"dtype": "uint8", "n": HEADER_BYTES, "lies": False, "regions": []}
    buckets = [bucket]
    for dtype, names in by_dtype.items():
        region = None
        for name in names:
            t = weights[name]
            if bucket["n"] and -(-bucket["n"] // ALIGN) * ALIGN + _nbytes(t) > bucket_bytes:
                bucket = {"dtype": "uint8", "n": 0, "lies": False, "regions": []}  # full: the next
                buckets.append(bucket)
                region = None
            if region is None:
                bucket["n"] = -(-bucket["n"] // ALIGN) * ALIGN
                region = {"dtype": _dtype_name(dtype), "start": bucket["n"], "n": 0, "tensors": []}
                bucket["regions"].append(region)
            region["tensors"].append([name, list(t.shape), region["n"], t.numel()])
            region["n"] += t.numel()
            bucket["n"] += _nbytes(t)
    return buckets


def _region(buffer: torch.Tensor, bucket: dict, region: dict) -> torch.Tensor:
    """A region of a bucket's flat buffer, as a flat tensor of the region's dtype."""
    if bucket["lies"]:
        return buffer
    dtype = getattr(torch, region["dtype"])
    size = region["n"] * dtype.itemsize
    return buffer[region["start"]: region["start"] + size].view(dtype)


def unpack(buffer: torch.Tensor, bucket: dict) -> dict[str, torch.Tensor]:
    """The tensors of a received bucket: views of its buffer."""
    out = {}
    for region in bucket["regions"]:
        flat = _region(buffer, bucket, region)
        for name, shape, start, n in region["tensors"]:
            out[name] = flat[start: start + n].view(shape)
    return out


def header_bucket(layout: list[dict]) -> int:
    """The index of the bucket that carries the header: the first packed one (there is always one)."""
    return next(i for i, bucket in enumerate(layout) if not bucket["lies"])


def header(buffer: torch.Tensor) -> tuple[int, int, int]:
    """(version, layout id, stride promised) from the header bucket's buffer."""
    version, layout_id, stride = buffer[:HEADER_BYTES].view(torch.int64).tolist()
    return version, layout_id, stride


def packed_names(layout: list[dict]) -> list[str]:
    """The names of the tensors a layout packs (the rest lie)."""
    return [t[0] for b in layout if not b["lies"] for region in b["regions"] for t in region["tensors"]]


def lying(bucket: dict, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """A lying bucket as one flat tensor of the weights' own memory (a lone tensor may be copied
    if it is not contiguous)."""
    first = weights[bucket["regions"][0]["tensors"][0][0]].detach()
    if len(bucket["regions"][0]["tensors"]) == 1:
        return first.reshape(-1)
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (bucket["n"],))


def pack(buffer: torch.Tensor, bucket: dict, weights: dict[str, torch.Tensor],
         head: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Copy a packed bucket's tensors into `buffer` (uint8, at least the bucket's bytes), with the
    header first when given; returns the part to send."""
    flat = buffer[: bucket["n"]]
    if head is not None:
        flat[:HEADER_BYTES].view(torch.int64).copy_(torch.tensor(head, dtype=torch.int64))
    for region in bucket["regions"]:
        # one copy kernel per region, not one per tensor (a tiny model's 53 copy_ calls took 0.6 ms
        # a publish in cProfile); `.to` is a no-op unless the weights live elsewhere (a GPU learner
        # on a gloo channel)
        torch.cat([weights[name].reshape(-1).to(buffer.device) for name, *_ in region["tensors"]],
                  out=_region(flat, bucket, region))
    return flat


def packing_buffers(layout: list[dict], device: torch.device) -> list[torch.Tensor]:
    """The publisher's two reusable packing buffers (one fills while the other is on the wire),
    as big as the largest packed bucket."""
    size = max((b["n"] for b in layout if not b["lies"]), default=0)
    return [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2)]


def _users(buffer: torch.Tensor) -> int:
    """How many tensors share `buffer`'s memory (itself included): views hold its storage."""
    return torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) - 1  # less the temporary


class ReceiveBuffers:
    """An engine's receive buffers, reused once nothing outside this pool holds them (CPU only).

    A buffer backs one bucket of one version (the views in its `Update`). It is free again once
    its memory has no other user: the engine copied that version into its model and dropped it,
    and the sync's newest version is a later one. Only what was freed since the last receive is
    kept (a changed layout's buffers go); on CUDA the caching allocator already recycles memory
    without the cost this avoids, so nothing is kept there."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.keep = device.type == "cpu" and hasattr(torch._C, "_storage_Use_Count")
        self._lent: list[torch.Tensor] = []
        self._free: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}

    def reclaim(self) -> None:
        """Before a receive: buffers that only this pool holds become free."""
        lent, self._free = [], {}
        for buffer in self._lent:
            if _users(buffer) == 1:
                self._free.setdefault((buffer.dtype, buffer.numel()), []).append(buffer)
            else:
                lent.append(buffer)
        self._lent = lent

    def take(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        free = self._free.get((dtype, n))
        buffer = free.pop() if free else torch.empty(n, dtype=dtype, device=self.device)
        if self.keep:
            self._lent.append(buffer)
        return buffer
