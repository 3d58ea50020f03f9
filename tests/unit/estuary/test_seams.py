"""The arrows between packages: actors and everything below them import nothing from the driver."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
BELOW_THE_DRIVER = ("configs", "learner", "rollout", "weights_sync", "streams", "models", "environments", "rewards")


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_actor_or_library_module_imports_the_driver_package():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p) if m.split(".")[0] == "estuary")
                 for package in BELOW_THE_DRIVER for p in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_weight_sync_channel_is_described_once_and_opened_through_it(tmp_path):
    from configs import load_config
    from configs.runtime import SyncChannel, sync_channel

    local = sync_channel(load_config("tiny_cpu", [f"run.output_dir={tmp_path}"]), tmp_path / "run")
    assert local == SyncChannel("local", str(tmp_path / "run" / "weights"))
    assert sync_channel(load_config("tiny_cpu", ["weights_sync.transport=ray", "run.name=r"]), tmp_path).address == "r"
    publisher, reader = local.open(), local.open()
    try:
        import torch

        publisher.publish({"w": torch.ones(3)}, version=1)
        assert reader.pull(newer_than=0).version == 1
    finally:
        reader.close()
        publisher.close()
    for path in ("learner/actor.py", "rollout/actor.py", "estuary/train.py"):  # no transport built by hand
        assert "make_weight_sync" not in (ROOT / path).read_text(), path
