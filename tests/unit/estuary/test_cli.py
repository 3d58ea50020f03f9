"""The `estuary` command: fast help, lazy imports, and subcommands that work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from estuary.cli import PRESET_NAMES, main
from models.presets import PRESETS


def test_help_imports_no_heavy_library():
    code = (
        "import sys\n"
        "from estuary.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'ray', 'omegaconf', 'mlflow', 'vllm') "
        "if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout
    assert "config" in out.stdout and "model" in out.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "estuary"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: estuary" in out.stdout


def test_cli_preset_names_match_the_registry():
    assert set(PRESET_NAMES) == set(PRESETS)


def test_model_init_writes_a_policy_transformers_loads(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["model", "init", "tiny-hybrid-moe", str(out), "--seed", "1"]) == 0
    assert "wrote tiny-hybrid-moe" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model_type"] == "nemotron_h"
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("override", "message"), [
    ("stream.max_len=100", "stream.max_len=100 is too small"),
    ("learner.num_learners=0", "learner.num_learners=0 must be > 0"),
    ("stream.max_unread=4", "stream.max_unread=4 is below learner.groups_per_step=8"),
    ("rollout.mix=round-robin", "rollout.mix"),
    ("eval.environments=[tool_use,chess]", r"eval.environments names \['chess'\]"),
])
def test_what_estuary_train_cannot_run_is_refused_up_front(override, message):
    from configs import load_config
    from configs.errors import ConfigError
    from estuary.run_setup import check_run_config

    check_run_config(load_config("tiny_cpu", []))
    with pytest.raises(ConfigError, match=message):
        check_run_config(load_config("tiny_cpu", [override]))


def test_a_mix_with_nothing_to_draw_is_refused_up_front():
    from configs import load_config
    from configs.errors import ConfigError
    from estuary.run_setup import check_run_config

    names = ("math", "code", "tool_use", "long_context")
    with pytest.raises(ConfigError, match="every environment has weight 0"):
        check_run_config(load_config("tiny_cpu", [f"environments.{n}.weight=0" for n in names]))
    no_sft = [f"environments.{n}.sft_weight=0" for n in names]
    with pytest.raises(ConfigError, match="every environment's sft_weight is 0"):
        check_run_config(load_config("tiny_cpu", no_sft))
    check_run_config(load_config("tiny_cpu", [*no_sft, "sft.steps=0"]))  # no SFT: nothing to draw from
    check_run_config(load_config("tiny_cpu", [f"environments.{n}.weight=0" for n in names[1:]]))
