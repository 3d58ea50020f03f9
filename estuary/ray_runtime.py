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
import socket
import sys
from pathlib import Path

from configs.schema import RayConfig


class RayUnavailableError(RuntimeError):
    """The configured Ray cluster cannot be reached; the message says how to start or drop it."""


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).is_file() if path else (Path.home() / ".ray" / "auth_token").is_file()


_PROCESS_TOKEN = secrets.token_hex(32)


def prepare_auth_env(joining: bool) -> str:
    """Set RAY_AUTH_MODE (and a token for a local cluster) unless the user set it; returns the mode."""
    if "RAY_AUTH_MODE" in os.environ:
        return os.environ["RAY_AUTH_MODE"]
    if joining:
        mode = "token" if _token_available() else "disabled"
    else:
        mode = "token"
        # One token per process: Ray's C++ core keeps the first token it saw, so a second local
        # cluster started by the same process must get the same one.
        os.environ.setdefault("RAY_AUTH_TOKEN", _PROCESS_TOKEN)
    os.environ["RAY_AUTH_MODE"] = mode
    return mode


def _unreachable(address: str, why: str) -> RayUnavailableError:
    return RayUnavailableError(
        f"cannot reach the Ray cluster at {address!r} ({why}); start one with `ray start --head`, "
        "or unset services.ray.address to run a local cluster"
    )


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast where ray.init would retry for minutes: the GCS/client port must accept TCP."""
    if address == "auto":
        if not Path("/tmp/ray/ray_current_cluster").is_file():
            raise _unreachable(address, "no cluster was started on this machine")
        return
    host_port = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailableError(f"services.ray.address={address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise _unreachable(address, e.strerror or str(e)) from None


def init_ray(cfg: RayConfig, namespace: str = "estuary") -> bool:
    """Connect to Ray as configured; returns True when a local cluster was started."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # Before `import ray`: Ray reads RAY_AUTH_MODE into its C++ config when it is first imported.
    already_imported = "ray" in sys.modules
    prepare_auth_env(joining=address is not None)
    import ray

    if already_imported:  # refresh the cached config, as Ray's own token set-up does
        from ray._raylet import Config

        Config.initialize("")
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(
            # "local": always a cluster of our own. Without it Ray joins whatever `ray start` left
            # in /tmp/ray/ray_current_cluster, and then refuses num_cpus.
            address="local",
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            namespace=namespace,
            include_dashboard=False,
            log_to_driver=True,
        )
        return True
    if address.startswith("http"):
        raise RayUnavailableError(
            f"services.ray.address={address!r} is the dashboard/jobs URL; give the cluster address "
            "(host:6379, ray://host:10001 or auto)"
        )
    check_address(address)
    try:
        ray.init(address=address, namespace=namespace)
    except (ConnectionError, RuntimeError, TimeoutError) as e:
        raise _unreachable(address, str(e).splitlines()[0]) from None
    return False


def shutdown_ray() -> None:
    """Disconnect; a local cluster started by `init_ray` stops with it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
