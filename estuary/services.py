"""The services a run needs, embedded by default or joined by address: Redis, Ray and MLflow.

    with Services(cfg.services, run_dir) as svc:
        svc.redis_url, svc.mlflow_uri      # Ray is connected too

With no addresses configured this starts a local Ray, an embedded Redis on a free loopback port
(when durable: an append-only file under `run_dir/redis`, and restarted if it dies) and an
MLflow sqlite store under `run_dir`; given addresses, it checks they answer and uses them.
Everything it started is stopped on exit, whether the block ends normally, by an exception or
by Ctrl-C.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from configs.schema import ServicesConfig
from estuary.ray_runtime import init_ray, shutdown_ray
from estuary.tracking import setup_mlflow
from streams.redis_server import EmbeddedRedis, check_reachable


class Services:
    """Redis, Ray and MLflow for one run; a context manager."""

    def __init__(self, cfg: ServicesConfig, run_dir: str | Path, ray: bool = True) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.use_ray = ray
        self.redis: EmbeddedRedis | None = None
        self.redis_url = ""
        self.mlflow_uri = ""
        self.started_ray = False
        self._stack = ExitStack()

    def __enter__(self) -> Services:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        redis_cfg = self.cfg.redis
        if redis_cfg.url:
            check_reachable(redis_cfg.url)
            self.redis_url = redis_cfg.url
        else:
            data_dir = self.run_dir / "redis" if redis_cfg.durable else None
            # A durable server that dies is restarted (its AOF replayed) and the run goes on; one
            # without persistence would come back empty, so its death ends the run instead.
            server = EmbeddedRedis(data_dir=data_dir, durable=redis_cfg.durable, binary=redis_cfg.binary,
                                   supervise=redis_cfg.durable)
            self.redis = self._stack.enter_context(server)
            self.redis_url = server.url
        if self.use_ray:
            self.started_ray = init_ray(self.cfg.ray)
            self._stack.callback(shutdown_ray)
        self.mlflow_uri = setup_mlflow(self.cfg.mlflow, self.run_dir)

    def __exit__(self, *exc) -> None:
        self._stack.close()
