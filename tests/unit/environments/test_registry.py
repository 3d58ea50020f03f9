"""The registry: register/make, clear unknown-id errors, and plug-ins found through entry points."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import environments
from environments import EnvironmentNotFound, Task, TextEnv, TurnResult

ROOT = Path(__file__).resolve().parents[3]


class EchoEnv(TextEnv):
    """Say the word back."""

    description = "echo the word"

    def generate(self, rng):
        word = rng.choice(["alpha", "beta", "gamma"])
        return Task(prompt=f"Say {word}.", answer=word)

    def from_row(self, row):
        return Task(prompt=row["prompt"], answer=row["answer"])

    def score_turn(self, action):
        ok = action.strip() == self.task.answer
        return TurnResult(done=True, correct=float(ok), verdict="correct" if ok else "wrong")

    def reference_turn(self):
        return self.task.answer


def test_register_and_make_with_defaults_and_overrides():
    environments.register("test/echo", entry_point=EchoEnv, package="tests", difficulty=2)
    env = environments.make("test/echo")
    assert isinstance(env, TextEnv) and env.difficulty == 2
    assert environments.make("test/echo", difficulty=0).difficulty == 0
    env.reset(seed=0)
    assert env.step(env.reference_answer())[1] == 1.0
    assert "test/echo" in environments.estuary_ids()


def test_unknown_id_names_the_closest():
    with pytest.raises(EnvironmentNotFound, match="did you mean: estuary/code"):
        environments.make("estuary/cod")
    with pytest.raises(EnvironmentNotFound, match="estuary envs"):
        environments.make("nothing/like-it-at-all")


PLUGIN_PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "0.1.0"

[project.entry-points."estuary.environments"]
{entry}
"""

PLUGIN_MODULE = '''
from environments import Task, TextEnv, TurnResult


class ShoutEnv(TextEnv):
    description = "shout the word in capitals"

    def generate(self, rng):
        word = rng.choice(["river", "delta", "tide"])
        return Task(prompt=f"Shout {word}.", answer=word.upper())

    def from_row(self, row):
        return Task(prompt=row["prompt"], answer=row["answer"])

    def score_turn(self, action):
        return TurnResult(done=True, correct=float(action == self.task.answer), verdict="done")

    def reference_turn(self):
        return self.task.answer
'''


def _build_plugin(root: Path, name: str, entry: str, module: str) -> Path:
    pkg = root / name
    (pkg / name.replace("-", "_")).mkdir(parents=True)
    (pkg / name.replace("-", "_") / "__init__.py").write_text(module)
    (pkg / "pyproject.toml").write_text(PLUGIN_PYPROJECT.format(name=name, entry=entry))
    return pkg


def test_installed_plugin_shows_up_and_builds(tmp_path):
    good = _build_plugin(tmp_path, "estuary-shout", '"shout/loud" = "estuary_shout:ShoutEnv"',
                         PLUGIN_MODULE)
    broken = _build_plugin(tmp_path, "estuary-broken", 'broken = "estuary_broken:register"',
                           "raise ImportError('needs a library that is not installed')\n")
    target = tmp_path / "site"
    for pkg in (good, broken):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "--target", str(target), str(pkg)],
                       check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    listing = subprocess.run([Path(sys.executable).parent / "estuary", "envs"], env=env,
                             capture_output=True, text=True, check=True)
    assert "shout/loud" in listing.stdout and "estuary-shout" in listing.stdout
    assert "shout the word in capitals" in listing.stdout
    assert "estuary/math" in listing.stdout  # a broken plug-in hides nothing
    assert "estuary-broken" in listing.stderr and "needs a library" in listing.stderr
    code = textwrap.dedent("""
        import environments
        env = environments.make("shout/loud")
        env.reset(seed=1)
        print(env.step(env.reference_answer())[1])
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "1.0"
