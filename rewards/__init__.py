"""Reward functions, composable and keyed by name."""
