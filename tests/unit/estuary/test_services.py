"""Embedded services: a real local Ray, a real Redis, a real MLflow store; nothing left running."""

from __future__ import annotations

import os
import time

import psutil
import pytest
import redis

from configs.schema import MlflowConfig, RayConfig, RedisConfig, ServicesConfig
from estuary.ray_runtime import RayUnavailableError, check_address, prepare_auth_env
from estuary.services import Services
from estuary.tracking import setup_mlflow, ui_command
from streams.redis_server import EmbeddedRedis, RedisUnavailableError

RAY_DAEMONS = ("raylet", "gcs_server", "plasma_store", "dashboard")


def _ray_daemons() -> set[int]:
    found = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["name"] or "")
        if any(d in text for d in RAY_DAEMONS) and proc.info["name"] != "pytest":
            found.add(proc.pid)
    return found


def _wait_until(predicate, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_embedded_services_start_work_and_stop(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    before = _ray_daemons()
    cfg = ServicesConfig(ray=RayConfig(num_cpus=1))
    with Services(cfg, tmp_path / "run") as svc:
        import mlflow
        import ray

        assert svc.started_ray and ray.is_initialized()
        assert ray.get(ray.remote(lambda: os.environ.get("RAY_AUTH_MODE")).remote()) == "token"
        client = redis.Redis.from_url(svc.redis_url)
        assert client.ping()
        redis_pid = svc.redis.pid
        assert svc.mlflow_uri == f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}"
        with mlflow.start_run() as run:
            mlflow.log_metric("reward", 0.5, step=1)
        history = mlflow.MlflowClient(svc.mlflow_uri).get_metric_history(run.info.run_id, "reward")
        assert [(m.step, m.value) for m in history] == [(1, 0.5)]
    assert not ray.is_initialized()
    assert not psutil.pid_exists(redis_pid) or psutil.Process(redis_pid).status() == "zombie"
    assert _wait_until(lambda: not (_ray_daemons() - before)), "Ray daemons left running"
    # A local cluster's token lives in the environment, never in ~/.ray, so a later
    # `ray start --head` on this machine is not silently switched to token auth.
    assert not (tmp_path / "home" / ".ray" / "auth_token").exists()


def test_services_stop_what_started_when_a_later_one_fails(tmp_path):
    cfg = ServicesConfig(ray=RayConfig(address="127.0.0.1:1"))
    started: list[EmbeddedRedis] = []
    original = EmbeddedRedis.start

    def spy(self):
        started.append(self)
        return original(self)

    EmbeddedRedis.start = spy
    try:
        with pytest.raises(RayUnavailableError, match="ray start --head"):
            with Services(cfg, tmp_path):
                pass
    finally:
        EmbeddedRedis.start = original
    assert started and started[0].pid is None  # the embedded Redis was stopped again


def test_given_redis_url_is_used_not_replaced(tmp_path):
    with EmbeddedRedis() as external:
        cfg = ServicesConfig(redis=RedisConfig(url=external.url))
        with Services(cfg, tmp_path, ray=False) as svc:
            assert svc.redis_url == external.url and svc.redis is None
    with pytest.raises(RedisUnavailableError, match="cannot reach Redis"):
        with Services(ServicesConfig(redis=RedisConfig(url="redis://127.0.0.1:1/0")), tmp_path,
                      ray=False):
            pass


def test_durable_redis_keeps_its_aof_in_the_run_folder(tmp_path):
    cfg = ServicesConfig(redis=RedisConfig(durable=True))
    with Services(cfg, tmp_path, ray=False) as svc:
        redis.Redis.from_url(svc.redis_url).xadd("s", {"a": 1})
        assert redis.Redis.from_url(svc.redis_url).config_get("appendonly")["appendonly"] == "yes"
    assert (tmp_path / "redis").is_dir()


def test_unreachable_ray_fails_fast_with_the_fix():
    start = time.monotonic()
    with pytest.raises(RayUnavailableError, match="unset services.ray.address"):
        check_address("127.0.0.1:1")
    assert time.monotonic() - start < 10  # ray.init itself would retry for minutes
    with pytest.raises(RayUnavailableError, match="host:port"):
        check_address("not-an-address")


def test_joining_uses_token_mode_only_when_a_token_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert prepare_auth_env(joining=True) == "disabled"
    monkeypatch.delenv("RAY_AUTH_MODE")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x" * 32)
    assert prepare_auth_env(joining=True) == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert prepare_auth_env(joining=True) == "disabled"  # an explicit choice is respected


def test_mlflow_given_uri_and_ui_hint(tmp_path):
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    assert setup_mlflow(MlflowConfig(tracking_uri=uri, experiment="e"), tmp_path / "run") == uri
    assert (tmp_path / "elsewhere.db").exists() and not (tmp_path / "run" / "mlflow.db").exists()
    assert ui_command(uri) == f"mlflow ui --backend-store-uri {uri}"
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_embedded_mlflow_keeps_artifacts_in_the_run_folder_not_where_the_user_stands(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    setup_mlflow(MlflowConfig(experiment="e"), tmp_path / "run")
    (tmp_path / "note.txt").write_text("hi")
    with mlflow.start_run():
        mlflow.log_artifact(str(tmp_path / "note.txt"))
    assert list((tmp_path / "run" / "mlartifacts").rglob("note.txt"))
    assert not (tmp_path / "mlruns").exists()
