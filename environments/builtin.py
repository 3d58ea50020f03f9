"""Registers Estuary's four built-in environment families under the `estuary/` namespace."""

from environments.registry import register

register("estuary/math", "environments.math_env:MathEnv")
register("estuary/code", "environments.code_env:CodeEnv")
register("estuary/tool_use", "environments.tool_use:ToolUseEnv", max_turns=4)
register("estuary/long_context", "environments.long_context:LongContextEnv")
