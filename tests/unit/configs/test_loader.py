"""Config loading: presets validate, overrides apply, and every mistake gets one clear line."""

from __future__ import annotations

import dataclasses

import pytest

from configs import Config, ConfigError, load_config
from configs.loader import PRESET_DIR
from configs.schema import LearnerConfig
from estuary.cli import main


def test_presets_load_as_plain_dataclasses():
    for path in PRESET_DIR.glob("*.yaml"):
        cfg = load_config(path)
        assert isinstance(cfg, Config)
        assert dataclasses.is_dataclass(cfg.learner) and isinstance(cfg.learner, LearnerConfig)
        assert isinstance(cfg.environments, dict)


def test_preset_values_and_names():
    tiny = load_config("tiny_cpu")
    assert tiny.model.preset == "tiny-hybrid-moe-2attn"
    assert set(tiny.environments) == {"math", "code", "tool_use", "long_context"}
    assert tiny.environments["math"].id == "estuary/math"
    nano = load_config("nemotron3_nano_gpu")
    assert nano.rollout.engine == "vllm" and nano.rollout.group_size == 16
    assert nano.learner.lr == pytest.approx(3e-6) and nano.learner.freeze_router


def test_overrides_merge_with_types():
    cfg = load_config("tiny_cpu", ["learner.lr=0.5", "rollout.num_workers=3",
                                   "environments.math.kwargs.difficulty=2", "run.mode=sync"])
    assert cfg.learner.lr == 0.5 and isinstance(cfg.learner.lr, float)
    assert cfg.rollout.num_workers == 3
    assert cfg.environments["math"].kwargs["difficulty"] == 2
    assert cfg.run.mode == "sync"


def test_schema_defaults_without_file():
    cfg = load_config(None, ["run.name=x"])
    assert cfg.run.name == "x" and cfg.environments == {}


def _cli_error(capsys, *argv: str) -> str:
    assert main(["config", "show", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("estuary: error: ")
    return err


def test_unknown_key_names_path_source_and_closest(capsys):
    err = _cli_error(capsys, "tiny_cpu", "learner.lrr=1")
    assert "'learner.lrr'" in err and "command line" in err and "learner.lr" in err


def test_unknown_key_in_file_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  sampling:\n    temprature: 0.7\n")
    err = _cli_error(capsys, str(bad))
    assert "rollout.sampling.temprature" in err and str(bad) in err
    assert "rollout.sampling.temperature" in err


def test_unknown_key_inside_environment_entry(capsys):
    err = _cli_error(capsys, "tiny_cpu", "environments.math.wieght=2")
    assert "environments.math.weight" in err


def test_wrong_type_names_key_value_and_type(capsys):
    err = _cli_error(capsys, "tiny_cpu", "learner.lr=fast")
    assert "learner.lr" in err and "'fast'" in err and "float" in err
    err = _cli_error(capsys, "tiny_cpu", "rollout.group_size=2.5")
    assert "rollout.group_size" in err and "2.5" in err and "int" in err


def test_missing_required_value(capsys):
    err = _cli_error(capsys, "tiny_cpu", "environments.extra.weight=1")
    assert "missing required value" in err and "environments.extra.id" in err


def test_missing_file(capsys):
    err = _cli_error(capsys, "no/such/file.yaml")
    assert "not found" in err and "no/such/file.yaml" in err and "tiny_cpu" in err


def test_invalid_choice_and_malformed_override(capsys):
    err = _cli_error(capsys, "tiny_cpu", "learner.advantage=ppo")
    assert "learner.advantage" in err and "'grpo'" in err
    err = _cli_error(capsys, "tiny_cpu", "learner.lr")
    assert "key=value" in err


def test_yaml_syntax_error(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("run:\n  name: [unclosed\n")
    err = _cli_error(capsys, str(bad))
    assert "cannot parse" in err and str(bad) in err


def test_config_error_is_a_value_error():
    with pytest.raises(ConfigError):
        load_config("tiny_cpu", ["rollout.sampling.top_p=1.5"])


def test_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", "tiny_cpu", "learner.lr=0.25"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.25" in out and "preset: tiny-hybrid-moe" in out


def test_copy_pretraining_settings_are_checked():
    for bad in ("sft.copy_steps=-1", "sft.copy_length=0", "sft.copy_lr=0", "sft.answer_steps=-1", "sft.warmup_steps=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].split(".")[1]):
            load_config("tiny_cpu", [bad])


def test_learner_threads_default_to_its_cpus_and_are_checked():
    assert load_config("tiny_cpu", []).learner.threads == 0  # 0: cpus_per_learner
    assert load_config("tiny_cpu", ["learner.threads=2"]).learner.threads == 2
    with pytest.raises(ConfigError, match=r"learner\.threads=-1 must be >= 0"):
        load_config("tiny_cpu", ["learner.threads=-1"])
