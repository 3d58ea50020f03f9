"""Text environments (math, code, tool use, long context) and their registry."""
