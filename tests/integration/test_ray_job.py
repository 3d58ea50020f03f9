"""`ray job submit --working-dir . -- estuary train configs/tiny_cpu.yaml` against `ray start --head`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from streams.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


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
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
