"""The collective transport sends buckets of bounded size, never a whole-model flat buffer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from weights_sync.collective import CollectiveWeightSync, ReceiveBuffers, bucket_layout
from weights_sync.membership import host_rendezvous


def _weights(scale: float) -> dict[str, torch.Tensor]:
    return {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4) * scale,
            "b": torch.full((5,), scale, dtype=torch.bfloat16), "c": torch.ones(2, 2) * scale,
            "big": torch.full((40,), scale), "d": torch.tensor(int(scale), dtype=torch.int64)}


@contextmanager
def _publisher_and_engine() -> Iterator[tuple[CollectiveWeightSync, CollectiveWeightSync]]:
    _store, address = host_rendezvous("127.0.0.1")
    engine = CollectiveWeightSync(address, rank=1, world_size=2, timeout_s=60)
    publisher = CollectiveWeightSync(address, rank=0, world_size=2, bucket_bytes=64, timeout_s=60,
                                     join_window_s=60)
    try:
        yield publisher, engine
    finally:
        publisher.close()
        engine.close()


def _wait_for(engine: CollectiveWeightSync, version: int):
    deadline = time.monotonic() + 30
    while engine.pull(newer_than=version - 1) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.pull(newer_than=version - 1)


def test_buckets_hold_one_dtype_each_and_at_most_the_bound_unless_one_tensor_is_bigger():
    layout = bucket_layout(_weights(1.0), bucket_bytes=64)
    assert [(b["dtype"], [t[0] for t in b["tensors"]]) for b in layout] == [
        ("float32", ["a", "c"]), ("bfloat16", ["b"]), ("float32", ["big"]), ("int64", ["d"])]
    assert all(b["n"] * 4 <= 64 for b in layout if b["dtype"] == "float32" and len(b["tensors"]) > 1)
    assert layout[0]["tensors"][1][2] == 12  # c starts after a in the same buffer


def test_a_bucketed_broadcast_arrives_whole_and_exact():
    with _publisher_and_engine() as (publisher, engine):
        for version in (1, 2):
            publisher.publish(_weights(float(version)), version)
        # two packing buffers per dtype, each as big as its largest bucket of several tensors (the
        # lone big one is sent as it lies)
        assert {k: [b.numel() for b in pair] for k, pair in publisher._buffers.items()} == {"float32": [16, 16]}
        update = _wait_for(engine, 2)
        assert update is not None and update.version == 2
        for name, value in _weights(2.0).items():
            assert torch.equal(update.weights[name], value) and update.weights[name].dtype == value.dtype, name


def test_receive_buffers_are_reused_only_once_nothing_else_holds_them():
    pool = ReceiveBuffers(torch.device("cpu"))
    assert pool.keep
    held = pool.take(torch.float32, 8)[2:6].view(2, 2)  # a version's tensor, still served
    first = held.untyped_storage().data_ptr()
    pool.reclaim()
    second = pool.take(torch.float32, 8).data_ptr()  # that version's views already dropped
    assert second != first
    del held  # the engine applied that version and let it go
    pool.reclaim()
    assert {pool.take(torch.float32, 8).data_ptr(), pool.take(torch.float32, 8).data_ptr()} == {first, second}
    assert pool.take(torch.float32, 8).data_ptr() not in (first, second)


def test_a_version_still_held_is_never_overwritten_by_later_ones():
    with _publisher_and_engine() as (publisher, engine):
        kept = None
        for version in range(1, 6):
            publisher.publish(_weights(float(version)), version)
            latest = _wait_for(engine, version)
            kept = kept or latest
        assert kept is not None and kept.version == 1
        for name, value in _weights(1.0).items():
            assert torch.equal(kept.weights[name], value), name
        assert latest is not None and latest.version == 5
        for name, value in _weights(5.0).items():
            assert torch.equal(latest.weights[name], value), name


def test_an_idle_engine_waits_on_its_inbox_and_is_woken_by_a_new_generation_and_by_close():
    """No poll: the receiver blocks on the store (for `IDLE_CHECK_S`, ten minutes), so only the
    inbox can wake it. A new generation's CLOSED and `close()` must each reach it at once."""
    with _publisher_and_engine() as (publisher, engine):
        publisher.publish(_weights(1.0), 1)
        assert _wait_for(engine, 1) is not None
        first = engine._inbox
        publisher._drop_group()  # as after a failed broadcast: the next publish opens a new generation
        publisher.publish(_weights(2.0), 2)  # waits (join window 60 s) until the engine joins it
        assert _wait_for(engine, 2).version == 2 and engine._inbox != first
        start = time.monotonic()
        engine.close()
        assert not engine._receiver.is_alive(), "close() did not wake the receiver's inbox wait"
        assert time.monotonic() - start < 5
