"""The `collective` (gloo broadcast, real processes) and `ray` (real local cluster) transports."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from weights_sync.membership import host_rendezvous
from weights_sync.protocol import make_weight_sync

ROOT = Path(__file__).resolve().parents[3]


def _weights(scale: float) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) * scale,
            "b.bias": torch.full((5,), scale, dtype=torch.bfloat16),
            "c.step": torch.tensor(int(scale), dtype=torch.int64)}


ENGINE = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_transports import _weights
    from weights_sync.protocol import make_weight_sync

    sync = make_weight_sync("collective", sys.argv[1], rank=int(sys.argv[2]), world_size=3)
    seen, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline and (not seen or seen[-1] < 3):
        update = sync.pull(newer_than=seen[-1] if seen else -1)
        if update is not None:
            expected = _weights(float(update.version))
            assert all(torch.equal(update.weights[k], v) and update.weights[k].dtype == v.dtype
                       for k, v in expected.items()), "a served update differs from the published one"
            seen.append(update.version)
        time.sleep(0.2 if sys.argv[2] == "2" else 0.01)  # engine 2 is slow: it skips versions
    print("versions", seen, flush=True)
    sync.close()
""")


def test_collective_broadcast_reaches_every_engine_and_only_goes_up():
    _store, address = host_rendezvous("127.0.0.1")  # the driver's part: it outlives every member
    code = ENGINE.format(tests=str(Path(__file__).parent))
    engines = [subprocess.Popen([sys.executable, "-c", code, address, str(rank)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (1, 2)]
    publisher = make_weight_sync("collective", address, rank=0, world_size=3, join_window_s=60)
    for version in (1, 2, 3):
        publisher.publish(_weights(float(version)), version)  # never waits for a slow engine's pull
        time.sleep(0.05)
    with pytest.raises(ValueError, match="not newer"):
        publisher.publish(_weights(1.0), 3)
    publisher.close()  # engines' receivers leave; what they received stays servable
    logs = [e.communicate(timeout=120)[0] for e in engines]
    for log in logs:
        versions = eval(log.split("versions", 1)[1].strip().splitlines()[0])  # noqa: S307 - our own output
        assert versions == sorted(set(versions)) and versions[-1] == 3, log


def test_bad_collective_address_is_a_clear_error():
    with pytest.raises(ValueError, match="tcp://host:port"):
        make_weight_sync("collective", "localhost:29600")
    with pytest.raises(ValueError, match="choose local, ray or collective"):
        make_weight_sync("nccl", "x")


def test_ray_object_store_transport(tmp_path):
    import ray

    from configs.schema import RayConfig
    from estuary.ray_runtime import init_ray

    init_ray(RayConfig(num_cpus=1))
    try:
        publisher = make_weight_sync("ray", "test-run")
        assert publisher.latest_version() == -1 and publisher.pull(-1) is None
        publisher.publish(_weights(1.0), 1)
        publisher.publish(_weights(2.0), 2)

        @ray.remote(num_cpus=0)
        def engine_pull():  # another process, reaching the registry by name
            engine = make_weight_sync("ray", "test-run")
            targets = {k: torch.zeros_like(v) for k, v in _weights(0.0).items()}
            version = engine.pull_into(targets, newer_than=0)
            return version, targets, engine.pull(newer_than=2)

        version, targets, nothing_newer = ray.get(engine_pull.remote())
        assert version == 2 and nothing_newer is None
        for name, t in _weights(2.0).items():
            assert torch.equal(targets[name], t) and targets[name].dtype == t.dtype
        with pytest.raises(ray.exceptions.RayTaskError, match="not newer"):
            publisher.publish(_weights(1.0), 2)
    finally:
        ray.shutdown()
