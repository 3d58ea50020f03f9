"""CI runs exactly the README's set-up and test commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith(("#", "set ", "cd ", "start=", "echo"))]


def test_ci_runs_the_readme_commands():
    readme_blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    readme_commands = {c for block in readme_blocks for c in _commands(block)}
    ci_commands = _commands((ROOT / ".ci" / "run").read_text())
    assert ci_commands == ["bash scripts/setup.sh", ".venv/bin/python -m pytest"]
    assert set(ci_commands) <= readme_commands
