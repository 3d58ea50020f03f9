"""MLflow set-up: a sqlite store under the run folder by default, or a given tracking URI.

MLflow 3 refuses a plain file store, so the embedded default is `sqlite:///<run_dir>/mlflow.db`;
`mlflow ui --backend-store-uri <that URI>` opens it; artifacts go to `<run_dir>/mlartifacts`. Telemetry is turned off before MLflow loads.
"""

from __future__ import annotations

import os
from pathlib import Path

from configs.schema import MlflowConfig


def disable_telemetry() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")


def tracking_uri(cfg: MlflowConfig, run_dir: str | Path) -> str:
    """The configured URI, else a sqlite store in `run_dir`."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    db = Path(run_dir).resolve() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def setup_mlflow(cfg: MlflowConfig, run_dir: str | Path) -> str:
    """Point MLflow at the store and select the experiment; returns the tracking URI."""
    disable_telemetry()
    import mlflow

    uri = tracking_uri(cfg, run_dir)
    mlflow.set_tracking_uri(uri)
    if not cfg.tracking_uri and mlflow.get_experiment_by_name(cfg.experiment) is None:
        # A sqlite store's default artifact root is ./mlruns under whatever folder the user
        # launched from; keep the artifacts next to the store, in the run folder.
        artifacts = (Path(run_dir).resolve() / "mlartifacts").as_uri()
        mlflow.create_experiment(cfg.experiment, artifact_location=artifacts)
    mlflow.set_experiment(cfg.experiment)
    return uri


def ui_command(uri: str) -> str:
    """What a person types to browse the runs in `uri`."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"
