"""`ray job submit --working-dir . -- estuary train configs/tiny_cpu.yaml` against `ray start --head`,
and the multi-learner, collective-broadcast config against two `ray start` nodes on loopback (slow)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from streams.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _stop_own_cluster(*temp_dirs: str) -> None:
    """Kill the Ray processes this test started (named by their temp folders) and their children.
    Never `ray stop`: it kills every Ray process on the machine, other users' clusters included."""
    import psutil

    def ours(proc) -> bool:
        try:
            return any(t in arg for arg in proc.cmdline() for t in temp_dirs)
        except psutil.Error:
            return False

    roots = [p for p in psutil.process_iter() if ours(p)]
    tree = {p.pid: p for root in roots for p in [root, *root.children(recursive=True)]}
    for proc in tree.values():
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(tree.values()), timeout=30)


@pytest.mark.slow  # 2 minutes in CI; its two-node variant below submits the same way
def test_ray_job_submit_runs_a_training_job_on_a_started_cluster(tmp_path):
    # The cluster is what a user starts by hand: the venv's `ray`, auth as the README says.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "HOME": str(tmp_path / "home")}
    ray, dashboard = str(BIN / "ray"), free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    start = subprocess.run([ray, "start", "--head", f"--port={free_port()}", f"--dashboard-port={dashboard}",
                            "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp}"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        job = subprocess.run(
            [ray, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(ROOT), "--",
             "estuary", "train", "configs/tiny_cpu.yaml", f"run.output_dir={tmp_path / 'runs'}", "run.name=job",
             "run.max_steps=1", "eval.instances=1", "eval.budgets=[]", "model.mtp_steps=0", "sft.steps=0",
             "learner.groups_per_step=1", "rollout.group_size=4", "rollout.max_concurrent_episodes=8"],
            env=env, capture_output=True, text=True, timeout=600)
        log = job.stdout + job.stderr
        assert job.returncode == 0, log[-4000:]
        assert "succeeded" in log and "done: 1 steps" in log
        assert (tmp_path / "runs/job/mlflow.db").is_file()
        assert (tmp_path / "runs/job/checkpoints/step-000001/config.json").is_file()
    finally:
        _stop_own_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _node_ports() -> list[str]:
    """Ports of one node's own services: two nodes on one machine must not share Ray's defaults."""
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


@pytest.mark.slow
def test_ray_job_submit_runs_two_learner_ranks_and_the_collective_transport_on_two_nodes(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "HOME": str(tmp_path / "home")}
    ray, port, dashboard = str(BIN / "ray"), free_port(), free_port()
    # A folder per node: sharing one, the second node's runtime-env agent deletes the job's working
    # directory (the driver's cwd on the head) when its own workers let go of it.
    temp, temp2 = (tempfile.mkdtemp(prefix=p, dir="/tmp") for p in ("ray-", "ray2-"))
    try:
        for args in ([ray, "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}", "--num-cpus=2",
                      "--include-dashboard=true", f"--temp-dir={temp}", *_node_ports()],
                     [ray, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2", f"--temp-dir={temp2}",
                      *_node_ports()]):
            start = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
            assert start.returncode == 0, start.stdout + start.stderr
        job = subprocess.run(
            [ray, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(ROOT), "--",
             "estuary", "train", "configs/tiny_cpu.yaml", f"run.output_dir={tmp_path / 'runs'}", "run.name=nodes",
             "run.max_steps=2", "eval.instances=1", "eval.every_steps=0", "eval.budgets=[]", "model.mtp_steps=0",
             "model.mtp_loss_coef=0", "sft.steps=0", "learner.num_learners=2", "learner.zero_stage=3",
             "learner.placement=STRICT_SPREAD", "learner.groups_per_step=2", "rollout.num_workers=2",
             "rollout.placement=SPREAD", "rollout.group_size=4", "rollout.max_concurrent_episodes=8",
             "weights_sync.transport=collective"],
            env=env, capture_output=True, text=True, timeout=1500)
        log = job.stdout + job.stderr
        assert job.returncode == 0, log[-4000:]
        assert "succeeded" in log and "done: 2 steps" in log
        final = tmp_path / "runs/nodes/checkpoints/step-000002"
        assert (final / "config.json").is_file()
        assert list((final / "trainer").rglob("*zero_pp_rank_1*")), "rank 1 (on the other node) wrote its shard"
    finally:
        _stop_own_cluster(temp, temp2)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(temp2, ignore_errors=True)
