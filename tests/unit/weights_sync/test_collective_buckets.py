"""The collective transport sends buckets of bounded size, never a whole-model flat buffer, and a
run of tensors lying end to end from where it lies."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from weights_sync.buckets import ALIGN, HEADER_BYTES, ReceiveBuffers, bucket_layout, lying
from weights_sync.collective import CollectiveWeightSync
from weights_sync.membership import host_rendezvous

_ALIGNED_HEADER = -(-HEADER_BYTES // ALIGN) * ALIGN  # where the header bucket's first region starts


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


def _names(bucket: dict) -> list[str]:
    return [t[0] for region in bucket["regions"] for t in region["tensors"]]


def test_packed_buckets_hold_aligned_regions_of_one_dtype_and_at_most_the_bound():
    layout = bucket_layout(_weights(1.0), bucket_bytes=80)
    # the header (24 bytes, its region aligned to 32), then a and c (float32, 64 bytes) do not fit one bucket of 80
    assert [(b["lies"], _names(b)) for b in layout] == [
        (True, ["big"]), (False, ["a"]), (False, ["c", "b", "d"])]
    first, second = layout[1], layout[2]
    assert first["regions"][0]["start"] == _ALIGNED_HEADER and first["n"] == _ALIGNED_HEADER + 48
    assert [(r["dtype"], r["start"]) for r in second["regions"]] == [("float32", 0), ("bfloat16", 16), ("int64", 32)]
    assert all(r["start"] % 8 == 0 for b in layout for r in b["regions"])
    assert all(b["n"] <= 80 for b in layout if not b["lies"])
    assert layout[0]["dtype"] == "float32" and layout[0]["n"] == 40  # bigger than a bucket: alone, as it lies


def test_a_bucketed_broadcast_arrives_whole_and_exact():
    with _publisher_and_engine() as (publisher, engine):
        for version in (1, 2):
            publisher.publish(_weights(float(version)), version)
        # two byte buffers, as big as the largest packed bucket (the lone big tensor goes as it lies)
        assert [b.numel() for b in publisher._buffers] == [64, 64]
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
        assert publisher._stride == 0  # packed tensors that change: every publication sent whole
        for name, value in _weights(5.0).items():
            assert torch.equal(latest.weights[name], value), name


def test_an_idle_engine_waits_in_the_group_and_is_released_by_a_new_generation_and_by_close():
    """No store on a publication's path: the receiver waits in the next version's posted receives (for
    `IDLE_CHECK_S`, ten minutes), which only the group's end releases. A new generation and
    `close()` (with the publisher alive: its watcher drops the group) must each release it at once."""
    with _publisher_and_engine() as (publisher, engine):
        publisher.publish(_weights(1.0), 1)
        assert _wait_for(engine, 1) is not None
        first = engine.generation
        publisher._drop_group()  # as after a failed broadcast: the next publish opens a new generation
        publisher.publish(_weights(2.0), 2)  # waits (join window 60 s) until the engine joins it
        assert _wait_for(engine, 2).version == 2 and engine.generation > first
        start = time.monotonic()
        engine.close()
        assert not engine._receiver.is_alive(), "close() did not release the receiver's pending receive"
        assert time.monotonic() - start < 5


def test_a_run_of_tensors_lying_end_to_end_goes_on_the_wire_from_where_it_lies():
    """As under DeepSpeed's ZeRO-1/2: parameters are views of one flat buffer. Such a run is sent
    without a copy; the tensors around it are packed; what arrives is exact either way."""
    flat = torch.arange(40, dtype=torch.float32)
    # in the state dict's order y comes first and a frozen tensor between: memory order counts
    weights = {"y": flat[12:40], "small": torch.ones(3), "x": flat[:12].view(3, 4), "tiny": torch.zeros(2)}
    layout = bucket_layout(weights, bucket_bytes=1 << 20, lie_bytes=64)
    assert [(b["lies"], _names(b)) for b in layout] == [(True, ["x", "y"]), (False, ["small", "tiny"])]
    assert [b["lies"] for b in bucket_layout(weights, bucket_bytes=1 << 20, lie_bytes=1 << 10)] == [False]
    with _publisher_and_engine() as (publisher, engine):
        publisher.bucket_bytes, publisher.lie_bytes = 1 << 20, 64
        for version in (1,):
            flat.add_(1)
            publisher.publish(weights, version)
            update = _wait_for(engine, version)
            assert update is not None and update.version == version
            for name, value in weights.items():
                assert torch.equal(update.weights[name], value), name
        sent = lying(publisher._layout[0], weights)
        assert sent.data_ptr() == flat.data_ptr() and sent.numel() == 40  # a view: nothing copied
        group, sent_from = publisher._group, []

        class Recording:  # what `_send` really puts on the wire
            def broadcast(self, tensor, root):
                sent_from.append(tensor.data_ptr())
                return group.broadcast(tensor, root)

        publisher._group = publisher._control = Recording()
        flat.add_(1)
        publisher.publish(weights, 2)
        assert _wait_for(engine, 2).weights["x"][0, 0].item() == flat[0].item()
        assert sent_from[0] == flat.data_ptr() and sent_from[1] == publisher._buffers[1].data_ptr()
        assert [b.numel() for b in publisher._buffers] == [_ALIGNED_HEADER + 20] * 2  # the header, 3 + 2 floats


def test_a_promised_stride_sends_runs_alone_and_a_broken_promise_opens_a_new_generation():
    """The version cannot ride in a run sent from the learner's memory, and a second broadcast for
    it costs a small model ~15%. Once a generation's second publication is a stride after its
    first with its packed tensors unchanged (the frozen routers), the header promises that stride:
    later publications are their runs alone, members count versions and keep the packed tensors.
    A version off the stride, or a packed tensor changed, opens a new generation sent whole."""
    import weights_sync.collective as collective

    flat = torch.arange(40, dtype=torch.float32)
    weights = {"x": flat[:12].view(3, 4), "y": flat[12:], "frozen": torch.ones(3)}
    with _publisher_and_engine() as (publisher, engine):
        publisher.bucket_bytes, publisher.lie_bytes = 1 << 20, 64

        def publish(version: int, state: dict[str, torch.Tensor] = weights) -> None:
            flat.add_(1)
            publisher.publish(state, version)
            update = _wait_for(engine, version)
            assert update is not None and update.version == version
            assert update.weights.keys() == state.keys()
            for name, value in state.items():
                assert torch.equal(update.weights[name], value), (version, name)

        publish(2)
        publish(4)
        assert publisher._stride == 2
        sent_from = []

        class Recording:
            def __init__(self, group) -> None:
                self.group = group

            def broadcast(self, tensor, root):
                sent_from.append(tensor.data_ptr())
                return self.group.broadcast(tensor, root)

        publisher._group = publisher._control = Recording(publisher._group)
        publish(6)
        publish(8)
        assert sent_from == [flat.data_ptr()] * 2  # the run alone, from where it lies
        publisher._group = publisher._control = publisher._group.group  # dropping it must close it
        assert publisher.counters["generations"] == 1
        publish(9)  # off the stride
        assert publisher.counters["generations"] == 2 and publisher._stride == 0
        publish(11)
        assert publisher._stride == 2
        # a new layout while promised (the held tensor gone): a new generation, no promise broken
        publish(13, {"x": weights["x"], "y": weights["y"], "other": torch.zeros(5)})
        assert publisher.counters["generations"] == 3 and publisher.counters["broken_promises"] == 1
        publish(15)
        publish(17)
        assert publisher._stride == 2 and publisher.counters["generations"] == 4
        weights["frozen"].add_(1)
        publish(19)  # the held tensor changed: it arrives, in a new generation
        assert publisher.counters["generations"] == 5 and publisher.counters["failed_broadcasts"] == 0
        publish(21)
        publish(22)  # a third broken promise (each costs a new generation): no more promises
        assert publisher.counters["broken_promises"] == collective.PROMISES_BROKEN_MAX == 3
        publish(24)
        assert publisher._stride == 0 and publisher.counters["generations"] == 6


def test_an_engine_that_starts_later_is_in_the_next_publication():
    """Its join reaches the publisher's watcher through the store, and the next publication
    re-forms the group around it first."""
    _store, address = host_rendezvous("127.0.0.1")
    first = CollectiveWeightSync(address, rank=1, world_size=3, timeout_s=60)
    publisher = CollectiveWeightSync(address, rank=0, world_size=3, timeout_s=60, join_window_s=2)
    late = None
    try:
        publisher.publish(_weights(1.0), 1)  # the window closes without the second engine
        assert _wait_for(first, 1) is not None and publisher._size == 2
        late = CollectiveWeightSync(address, rank=2, world_size=3, timeout_s=60)
        deadline = time.monotonic() + 30
        while not publisher._dirty and time.monotonic() < deadline:
            time.sleep(0.01)
        publisher.publish(_weights(2.0), 2)
        assert publisher._size == 3 and publisher.counters["failed_broadcasts"] == 0
        for engine in (first, late):
            assert _wait_for(engine, 2).version == 2
    finally:
        publisher.close()
        for engine in (first, late):
            if engine is not None:
                engine.close()


def test_an_idle_time_out_re_forms_the_group_before_the_next_publication(monkeypatch):
    """An engine whose posted receives time out while the publisher is idle tells the publisher's
    watcher, so the next publication re-forms first instead of failing on it."""
    import weights_sync.collective as collective

    monkeypatch.setattr(collective, "IDLE_CHECK_S", 1.0)
    with _publisher_and_engine() as (publisher, engine):
        publisher.publish(_weights(1.0), 1)
        assert _wait_for(engine, 1) is not None
        deadline = time.monotonic() + 30
        while not publisher._dirty and time.monotonic() < deadline:  # the receive times out after 1 s
            time.sleep(0.05)
        publisher.publish(_weights(2.0), 2)
        assert publisher.counters["failed_broadcasts"] == 0 and publisher.counters["generations"] == 2
        assert _wait_for(engine, 2).version == 2


def test_a_new_layout_opens_a_new_generation_and_a_stale_leave_is_ignored():
    with _publisher_and_engine() as (publisher, engine):
        publisher.publish(_weights(1.0), 1)
        assert _wait_for(engine, 1) is not None
        generation = engine.generation
        grown = {**_weights(2.0), "e": torch.full((3,), 2.0)}
        publisher.publish(grown, 2)  # members hold receives for one layout: they must re-join
        update = _wait_for(engine, 2)
        assert engine.generation > generation and torch.equal(update.weights["e"], grown["e"])
        publisher.store.queue_push("events", f"leave:{generation}")  # an old generation's: ignored
        time.sleep(0.3)
        assert publisher._formed
        publisher.publish({**_weights(3.0), "e": torch.full((3,), 3.0)}, 3)  # the same layout
        assert _wait_for(engine, 3).version == 3 and publisher.counters["generations"] == 2
