"""The environment registry: gymnasium's, plus plug-in discovery through Python entry points.

    environments.register("mylab/echo", entry_point="mylab.envs:EchoEnv", max_turns=2)
    env = environments.make("mylab/echo", difficulty=1)

A plug-in package declares, in its pyproject.toml,

    [project.entry-points."estuary.environments"]
    "mylab/echo" = "mylab.envs:EchoEnv"          # a TextEnv subclass, registered under that id
    mylab = "mylab.envs:register_all"            # or a function that calls register() itself

and Estuary loads those entry points on first use. A plug-in that fails to import is reported
(package and error) by `estuary envs` and in the unknown-id error; the others still work.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import gymnasium as gym

ENTRY_POINT_GROUP = "estuary.environments"


class EnvironmentNotFound(KeyError):
    """An id that nobody registered; the message lists the closest ids."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class EnvInfo:
    id: str
    description: str
    package: str


_SOURCES: dict[str, str] = {}  # id -> the package that registered it
_PLUGIN_ERRORS: dict[str, str] = {}  # package -> import error
_discovered = False
_lock = threading.Lock()


def register(id: str, entry_point: str | type, package: str = "estuary", **defaults: Any) -> None:
    """Register an environment id; `defaults` become constructor kwargs that `make` can override."""
    if id in gym.registry:
        del gym.registry[id]  # re-registering (e.g. a reloaded plug-in) replaces the old spec
    gym.register(id=id, entry_point=entry_point, kwargs=defaults, disable_env_checker=True,
                 order_enforce=False)
    _SOURCES[id] = package


def discover_plugins() -> None:
    """Load every `estuary.environments` entry point once; failures are recorded, not raised."""
    global _discovered
    with _lock:
        if _discovered:
            return
        _discovered = True
        import environments.builtin  # noqa: F401  (registers estuary/*)

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            package = ep.dist.name if ep.dist else ep.module
            try:
                obj = ep.load()
                if isinstance(obj, type):
                    register(ep.name, obj, package=package)
                else:
                    before = set(gym.registry)
                    obj()
                    for new_id in set(gym.registry) - before:
                        _SOURCES[new_id] = package
            except Exception as e:  # noqa: BLE001 - a broken plug-in must not hide the others
                _PLUGIN_ERRORS[package] = f"{type(e).__name__}: {e}"


def estuary_ids() -> list[str]:
    discover_plugins()
    return sorted(_SOURCES)


def plugin_errors() -> dict[str, str]:
    discover_plugins()
    return dict(_PLUGIN_ERRORS)


def _not_found(id: str) -> EnvironmentNotFound:
    ids = estuary_ids()
    close = difflib.get_close_matches(id, ids, n=3, cutoff=0.4)
    hint = f"did you mean: {', '.join(close)}" if close else f"registered: {', '.join(ids)}"
    broken = "".join(f"; plug-in {pkg} failed to load ({err})" for pkg, err in plugin_errors().items())
    return EnvironmentNotFound(f"unknown environment {id!r}; {hint} (see `estuary envs`){broken}")


def make(id: str, **kwargs: Any):
    """Build a registered environment (a `TextEnv`), kwargs overriding the registered defaults."""
    discover_plugins()
    if id not in _SOURCES and id not in gym.registry:
        raise _not_found(id)
    env = gym.make(id, disable_env_checker=True, **kwargs)
    return env.unwrapped


def env_factory(cfg) -> Callable[[], Any]:
    """A zero-argument builder of the environment an `EnvironmentConfig` describes (its id, its
    kwargs and its reward list), checked by building one now: a bad config fails at start-up, not
    in the first episode."""
    kwargs = dict(cfg.kwargs)
    if cfg.rewards:
        kwargs["rewards"] = list(cfg.rewards)
    make(cfg.id, **kwargs)
    return functools.partial(make, cfg.id, **kwargs)


def describe() -> list[EnvInfo]:
    """Every registered Estuary environment with its one-line description and package."""
    rows = []
    for env_id in estuary_ids():
        entry = gym.registry[env_id].entry_point
        cls = _resolve(entry)
        doc = getattr(cls, "description", "") or (cls.__doc__ or "").strip().splitlines()[0:1]
        rows.append(EnvInfo(env_id, doc if isinstance(doc, str) else "".join(doc), _SOURCES[env_id]))
    return rows


def _resolve(entry: Any) -> Any:
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        return getattr(importlib.import_module(module), attr)
    return entry
