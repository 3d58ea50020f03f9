"""Join a Ray cluster, or start a local one, with Ray's token authentication handled.

Ray >= 2.60 turns token auth on by default. A plain local `ray.init()` then writes
`~/.ray/auth_token`, and every later `ray start --head` on that machine finds the file, turns token
auth on, and a `ray job submit` without `RAY_AUTH_MODE=token` is refused. So:

- a local cluster gets a fresh per-process token in the environment (`RAY_AUTH_TOKEN`), inherited
  by Ray's own processes: the cluster is protected and nothing is written to `~/.ray`;
- when joining a cluster (an address, or `RAY_ADDRESS` inside `ray job submit`), token mode is
  turned on if a token is available and the mode was not set explicitly.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from configs.schema import RayConfig


class RayUnavailableError(RuntimeError):
    """The configured Ray cluster cannot be reached; the message says how to start or drop it."""


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).is_file() if path else (Path.home() / ".ray" / "auth_token").is_file()


def prepare_auth_env(joining: bool) -> str:
    """Set RAY_AUTH_MODE (and a token for a local cluster) unless the user set it; returns the mode."""
    if "RAY_AUTH_MODE" in os.environ:
        return os.environ["RAY_AUTH_MODE"]
    if joining:
        mode = "token" if _token_available() else "disabled"
    else:
        mode = "token"
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = mode
    return mode


def init_ray(cfg: RayConfig, namespace: str = "estuary") -> bool:
    """Connect to Ray as configured; returns True when a local cluster was started."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    prepare_auth_env(joining=address is not None)
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            namespace=namespace,
            include_dashboard=False,
            log_to_driver=True,
        )
        return True
    try:
        ray.init(address=address, namespace=namespace)
    except (ConnectionError, RuntimeError, TimeoutError) as e:
        raise RayUnavailableError(
            f"cannot reach the Ray cluster at {address!r} ({str(e).splitlines()[0]}); start one with "
            "`ray start --head`, or unset services.ray.address to run a local cluster"
        ) from None
    return False


def shutdown_ray() -> None:
    """Disconnect; a local cluster started by `init_ray` stops with it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
