"""A real end-to-end run: local Ray, embedded Redis, MLflow on sqlite, rollout and learner actors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from configs import load_config
from estuary.train import train
from streams.redis_server import free_port


def _cfg(tmp_path, *overrides):
    return load_config("tiny_cpu", [
        f"run.output_dir={tmp_path}", "run.max_steps=3", "eval.instances=2", "eval.every_steps=2",
        "learner.groups_per_step=2", "sft.steps=4", "sft.batch_size=4", "sft.copy_steps=2", "sft.answer_steps=2",
        "learner.checkpoint_every=2", "rollout.max_concurrent_episodes=16",
        "rollout.group_size=4", "environments.tool_use.kwargs.max_turns=2",
        # a 4-step warm start still runs most samples to the length limit; the quick start's overlong
        # filter would then leave a step with no token to train, and this test checks the plumbing
        "learner.overlong_filter=false", *overrides])


def test_a_short_run_trains_logs_to_mlflow_and_checkpoints(tmp_path):
    """Asynchronous, with MTP drafting, everything embedded (MLflow on sqlite in the run folder)."""
    mode = "async"
    cfg = _cfg(tmp_path, f"run.mode={mode}", f"run.name={mode}", "model.mtp_steps=1", "learner.ema_decay=0.5")
    result = train(cfg)
    assert result.steps == 3
    assert result.checkpoint.endswith("step-000003")
    # the final policy is the weight average: written beside the checkpoints, and not the last weights
    from safetensors.torch import load_file

    averaged = load_file(tmp_path / mode / "final_policy" / "model.safetensors")
    last = load_file(Path(result.checkpoint) / "model.safetensors")
    assert averaged.keys() == last.keys() and any(not torch.equal(averaged[k], last[k]) for k in last)
    assert set(result.evals) == {"start", "end"} and "math:budget8" in result.evals["end"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / mode / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    assert run.data.params["learner.lr"] == str(cfg.learner.lr)
    assert run.data.params["final_policy"] == str(tmp_path / mode / "final_policy")
    history = client.get_metric_history(result.run_id, "learner/loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert client.get_metric_history(result.run_id, "learner/trained_tokens")[-1].value > 0
    assert any(k.startswith("eval/math/reward") for k in run.data.metrics)
    assert any(k.startswith("rollout/") and k.endswith("/reward_mean") for k in run.data.metrics)
    assert any(k.endswith("/generated_reward_mean") for k in run.data.metrics)  # before the learner's filters
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "eval", "samples.json"} <= artifacts
    summary = client.download_artifacts(result.run_id, "eval/summary.txt", str(tmp_path / "dl"))
    lines = Path(summary).read_text().splitlines()  # before and after RL, side by side
    assert lines[0].startswith("held out (seeds 1,000,000-") and lines[-1].startswith("mean reward (")


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_sync_mode_against_a_real_mlflow_server_read_back_over_rest(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         # artifacts go through the server into tmp_path, not into the client's ./mlruns
         "--serve-artifacts", "--default-artifact-root", "mlflow-artifacts:/",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        # two rollout workers, as a sync run uses every core (each produces its share of a step)
        cfg = _cfg(tmp_path, "run.mode=sync", "run.name=sync", "model.mtp_steps=0", "rollout.num_workers=2",
                   "services.ray.num_cpus=3", f"services.mlflow.tracking_uri={base}")
        result = train(cfg)
        assert result.steps == 3 and not (tmp_path / "sync/mlflow.db").exists()  # it went to the server
        history = _get(f"{base}/api/2.0/mlflow/metrics/get-history?run_id={result.run_id}&metric_key=learner/loss")
        assert [m["step"] for m in history["metrics"]] == [1, 2, 3]
        run = _get(f"{base}/api/2.0/mlflow/runs/get?run_id={result.run_id}")["run"]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["run.mode"] == "sync" and params["final_checkpoint"].endswith("step-000003")
        keys = {m["key"] for m in run["data"]["metrics"]}
        assert {"eval/math/reward", "staleness/mean", "stream/depth"} <= keys
        assert list((tmp_path / "artifacts").rglob("samples.json"))  # the sample table reached the server
    finally:
        server.terminate()
        server.wait(timeout=30)
