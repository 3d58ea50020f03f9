"""Text environments (math, code, tool use, long context), their registry and the code sandbox.

    import environments
    env = environments.make("estuary/math", difficulty=1)
    messages, info = env.reset(seed=0)

Add your own with `environments.register(id, entry_point="pkg.module:Class", **defaults)`, or
from a plug-in package through the `estuary.environments` entry-point group.
"""

from environments.base import HACK_VERDICTS, DatasetError, Generation, Task, TextEnv, TurnResult
from environments.registry import (
    EnvironmentNotFound,
    describe,
    env_factory,
    estuary_ids,
    make,
    plugin_errors,
    register,
)

__all__ = [
    "HACK_VERDICTS", "DatasetError", "EnvironmentNotFound", "Generation", "Task", "TextEnv", "TurnResult",
    "describe", "env_factory", "estuary_ids", "make", "plugin_errors", "register",
]
