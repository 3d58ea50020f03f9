"""Shared-memory weight sync: newest complete version only, across processes, nothing leaked."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from weights_sync.local import SharedMemoryWeightSync
from weights_sync.protocol import make_weight_sync

ROOT = Path(__file__).resolve().parents[3]


def _weights(scale: float) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) * scale,
            "b.bias": torch.full((5,), scale, dtype=torch.bfloat16),
            "c.step": torch.tensor(int(scale), dtype=torch.int64)}


def _segments() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith("estuary-w")}


def test_publish_pull_versions_are_monotone(tmp_path):
    pub, sub = make_weight_sync("local", str(tmp_path)), make_weight_sync("local", str(tmp_path))
    assert sub.latest_version() == -1 and sub.pull(-1) is None
    pub.publish(_weights(1.0), version=1)
    pub.publish(_weights(2.0), version=2)
    update = sub.pull(newer_than=0)
    assert update.version == 2  # the newest, skipping stale ones
    for name, t in _weights(2.0).items():
        assert torch.equal(update.weights[name], t) and update.weights[name].dtype == t.dtype
    assert sub.pull(newer_than=2) is None
    with pytest.raises(ValueError, match="not newer"):
        pub.publish(_weights(3.0), version=2)
    pub.close()


def test_a_crashed_publication_is_never_served(tmp_path, monkeypatch):
    pub = SharedMemoryWeightSync(tmp_path)
    pub.publish(_weights(1.0), version=1)

    def killed(*_):
        raise KeyboardInterrupt("publisher killed before it pointed the control block at the new version")

    monkeypatch.setattr(pub, "_point_at", killed)
    with pytest.raises(KeyboardInterrupt):
        pub.publish(_weights(9.0), version=2)
    monkeypatch.undo()
    update = SharedMemoryWeightSync(tmp_path).pull(newer_than=0)
    assert update.version == 1 and torch.equal(update.weights["a.weight"], _weights(1.0)["a.weight"])
    pub.close()


def test_a_segment_being_rewritten_is_not_served(tmp_path):
    import numpy as np

    pub = SharedMemoryWeightSync(tmp_path)
    pub.publish(_weights(1.0), version=1)
    header = np.ndarray((2,), dtype=np.int64, buffer=pub._ring[0].buf)
    header[0] += 1  # odd sequence: a writer is in the middle of it
    reader = SharedMemoryWeightSync(tmp_path)
    assert reader.pull(newer_than=0) is None
    header[0] += 1
    assert reader.pull(newer_than=0).version == 1
    del header
    reader.close()
    pub.close()


def test_pull_into_copies_into_existing_tensors(tmp_path):
    pub, sub = SharedMemoryWeightSync(tmp_path), SharedMemoryWeightSync(tmp_path)
    pub.publish(_weights(3.0), version=5)
    targets = {k: torch.zeros_like(v) for k, v in _weights(0.0).items()}
    before = {k: v.data_ptr() for k, v in targets.items()}
    assert sub.pull_into(targets, newer_than=4) == 5
    assert all(torch.equal(targets[k], v) for k, v in _weights(3.0).items())
    assert {k: v.data_ptr() for k, v in targets.items()} == before
    sub.close()
    pub.close()


def test_another_process_pulls_and_nothing_leaks(tmp_path):
    before = _segments()
    pub = SharedMemoryWeightSync(tmp_path)
    for v in range(1, 5):
        pub.publish(_weights(float(v)), version=v)
    assert len(_segments() - before) == 4  # a fixed ring, reused by every publication, and the control block
    code = textwrap.dedent(f"""
        from weights_sync.local import SharedMemoryWeightSync
        u = SharedMemoryWeightSync({str(tmp_path)!r}).pull(newer_than=0)
        print(u.version, float(u.weights["a.weight"][0, 1]))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["4", "4.0"]
    assert len(_segments() - before) == 4  # the reader neither leaked nor removed segments
    pub.close()
    assert _segments() <= before


def test_unknown_transport():
    with pytest.raises(ValueError, match="local"):
        make_weight_sync("carrier-pigeon", "/tmp/x")


def test_remove_channel_clears_a_previous_runs_segments(tmp_path):
    # A learner is killed with its run, not closed: a new run in the same folder must not read the
    # old run's version (its learner would skip publishing what the engines "already hold").
    from weights_sync.local import remove_channel

    old = SharedMemoryWeightSync(tmp_path / "weights")
    old.publish({"w": torch.ones(4)}, version=60)
    names = [segment._name for segment in old._ring] + [old._control._name]
    assert remove_channel(tmp_path / "weights") == len(names)
    assert not any(os.path.exists(f"/dev/shm{name}") for name in names)
    assert SharedMemoryWeightSync(tmp_path / "weights").latest_version() == -1
    assert remove_channel(tmp_path / "weights") == 0  # nothing left: idempotent
