"""A learner killed with SIGKILL resumes from its last checkpoint and ends exactly where an
uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[3]

LEARNER = textwrap.dedent("""
    import sys, time
    import numpy as np, torch
    sys.path.insert(0, {tests!r})
    from test_trainer import _sample
    from learner.batching import pack
    from learner.checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
    from learner.losses import LossConfig
    from learner.trainer import Trainer, TrainerOptions
    from models.policy import init_policy

    run_dir, total, pause_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    policy = init_policy("tiny-hybrid-moe", seed=0)
    trainer = Trainer(policy.model, TrainerOptions(backend="torch", lr=1e-3, warmup_steps=3, ema_decay=0.5))
    start = 0
    path = latest_checkpoint(run_dir)
    if path is not None:
        start = restore_checkpoint(path, policy, trainer)["step"]
    for step in range(start + 1, total + 1):
        gen = np.random.default_rng(step)  # the data of step k is the same in every run
        samples = [_sample(policy, [5, 6, 7], list(gen.integers(30, 90, 4))) for _ in range(4)]
        trainer.step(pack(samples, [1.0, -1.0, 0.5, -0.5], max_tokens=16), LossConfig(is_correction="none"))
        save_checkpoint(run_dir, policy, trainer, step=step, version=step, extra={{"stream_acked": step * 4}})
        print("step", step, flush=True)
        if step == pause_after:
            time.sleep(60)  # the test kills the process here
    policy.save(run_dir + "/final")
    policy.save(run_dir + "/averaged", trainer.averaged_state_dict())
    print("done", flush=True)
""")


def _run(run_dir: Path, total: int, pause_after: int = -1) -> subprocess.Popen:
    code = LEARNER.format(tests=str(Path(__file__).parent))
    return subprocess.Popen([sys.executable, "-c", code, str(run_dir), str(total), str(pause_after)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)


def test_killed_learner_resumes_exactly(tmp_path):
    straight = _run(tmp_path / "straight", total=5)
    assert straight.communicate(timeout=300)[0].strip().endswith("done")

    killed = _run(tmp_path / "killed", total=5, pause_after=3)
    for line in killed.stdout:
        if line.strip() == "step 3":
            break
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    resumed = _run(tmp_path / "killed", total=5)
    out = resumed.communicate(timeout=300)[0].split("\n")
    assert out[0] == "step 4"  # it picked up after the last checkpoint, nothing trained twice

    for final in ("final", "averaged"):  # the weights and their average (`ema_decay`) both resume
        a = load_file(tmp_path / "straight" / final / "model.safetensors")
        b = load_file(tmp_path / "killed" / final / "model.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (final, name)
    live = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    assert any(not torch.equal(live[k], a[k]) for k in a)  # the average is not the last weights
    meta = (tmp_path / "killed" / "checkpoints" / "LATEST").read_text()
    assert meta == "step-000005"
    assert len(list((tmp_path / "killed" / "checkpoints").glob("step-*"))) == 2  # older ones pruned


def test_deepspeed_trainer_state_round_trips(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_trainer import _sample

    from learner.batching import pack
    from learner.checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
    from learner.losses import LossConfig
    from learner.trainer import Trainer, TrainerOptions
    from models.policy import init_policy

    def batch(policy, seed):
        gen = torch.Generator().manual_seed(seed)
        samples = [_sample(policy, [5, 6, 7], torch.randint(30, 90, (4,), generator=gen).tolist())
                   for _ in range(2)]
        return pack(samples, [1.0, -1.0], max_tokens=16)

    cfg = LossConfig(is_correction="none")
    reference = init_policy("tiny-hybrid-moe", seed=0)
    ref_trainer = Trainer(reference.model, TrainerOptions(backend="deepspeed", lr=1e-3))
    for seed in (1, 2):
        ref_trainer.step(batch(reference, seed), cfg)

    first = init_policy("tiny-hybrid-moe", seed=0)
    trainer = Trainer(first.model, TrainerOptions(backend="deepspeed", lr=1e-3))
    trainer.step(batch(first, 1), cfg)
    save_checkpoint(tmp_path, first, trainer, step=1, version=1)

    second = init_policy("tiny-hybrid-moe", seed=5)  # different weights until restored
    resumed = Trainer(second.model, TrainerOptions(backend="deepspeed", lr=1e-3))
    assert restore_checkpoint(latest_checkpoint(tmp_path), second, resumed)["step"] == 1
    resumed.step(batch(second, 2), cfg)
    ref_state = reference.model.state_dict()
    for name, value in second.model.state_dict().items():
        assert torch.allclose(value, ref_state[name], atol=1e-6), name
