"""Shared fixtures: a quiet, offline, hermetic environment for every test."""

from __future__ import annotations

import os
import tempfile

import pytest

# No test may reach a model hub or phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Warm starts cached by one test run stay out of the user's cache (and out of the next run).
os.environ.setdefault("ESTUARY_CACHE", tempfile.mkdtemp(prefix="estuary-test-cache-"))


@pytest.fixture(scope="session")
def tiny_policy_dirs(tmp_path_factory):
    """Each tiny preset written once per session as an HF directory."""
    from models.policy import write_preset
    from models.presets import TINY

    root = tmp_path_factory.mktemp("policies")
    return {name: write_preset(name, root / name, seed=0) for name in TINY}
