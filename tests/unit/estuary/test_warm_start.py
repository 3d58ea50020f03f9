"""The warm start (preset + SFT + MTP heads) is built once, then reused while its inputs are unchanged."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from configs.loader import load_config
from estuary.warm_start import BUILT_ON, machine, sft_environments, warm_start, warm_start_key


def _cfg(*extra: str):
    return load_config("tiny_cpu", ["sft.steps=2", "sft.batch_size=2", "sft.copy_steps=2", "sft.answer_steps=2",
                                    "model.mtp_steps=0",
                                    "environments={math: {id: estuary/math}}", *extra])


def _weights(policy_dir):
    return load_file(str(next(policy_dir.glob("*.safetensors"))))


def test_second_run_reuses_the_cached_warm_start(tmp_path, monkeypatch):
    monkeypatch.setenv("ESTUARY_CACHE", str(tmp_path / "cache"))
    said: list[str] = []
    first = warm_start(_cfg(), tmp_path / "a" / "policy", said.append)
    assert any("cached as" in s for s in said) and any(s.startswith("sft:") for s in said)
    assert any(s.startswith("copy pretraining:") for s in said) and any(s.startswith("answer pretraining:") for s in said)
    said.clear()
    second = warm_start(_cfg(), tmp_path / "b" / "policy", said.append)
    built_on = json.loads((first / BUILT_ON).read_text())
    assert built_on == machine() and built_on["cpu"]  # the build names the machine it ran on ...
    assert any("reusing the cached policy" in s and built_on["cpu"] in s for s in said)  # ... and a reuse says it
    assert not any(s.startswith("sft:") for s in said)  # nothing was trained again
    a, b = _weights(first), _weights(second)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_any_input_that_changes_the_policy_changes_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("ESTUARY_CACHE", str(tmp_path / "cache"))
    base = warm_start_key(_cfg())
    assert warm_start_key(_cfg()) == base
    for change in ("sft.steps=3", "sft.lr=1e-4", "sft.copy_steps=5", "sft.answer_steps=5", "sft.warmup_steps=3",
                   "run.seed=1", "model.preset=tiny-hybrid-dense",
                   "environments.math.kwargs={difficulty: 1}", "rollout.budget.max_tokens=48"):
        assert warm_start_key(_cfg(change)) != base, change
    assert warm_start_key(_cfg("sft.cache=false")) == base  # whether to cache is not an input
    # nor are the learner's settings for an environment's groups
    assert warm_start_key(_cfg("environments.math.kl_coef=0", "environments.math.max_staleness=1",
                               "environments.math.rewards=[length]", "environments.code.overlong_filter=false")) == base
    # RL's mix may change apart from SFT's: with `sft_weight` at the old weight the key stays
    assert warm_start_key(_cfg("environments.math.weight=3", "environments.math.sft_weight=1")) == base
    assert warm_start_key(_cfg("environments.math.weight=3")) == base  # the config sets math's sft_weight
    assert warm_start_key(_cfg("environments.code.weight=3")) != base  # no sft_weight: SFT's mix changed
    assert warm_start_key(_cfg("environments.math.sft_weight=3")) != base
    said: list[str] = []
    warm_start(_cfg("sft.cache=false"), tmp_path / "c" / "policy", said.append)
    assert not any("cache" in s for s in said) and not (tmp_path / "cache").exists()


def test_a_damaged_build_record_does_not_stop_a_reuse(tmp_path):
    from estuary.warm_start import _built_on

    (tmp_path / BUILT_ON).write_text("{not json")
    assert _built_on(tmp_path) == ""
    (tmp_path / BUILT_ON).write_text(json.dumps({"cpu": "Some CPU"}))
    assert _built_on(tmp_path) == "Some CPU"
    assert _built_on(tmp_path / "missing") == ""


def test_sft_draws_by_sft_weight_where_set_and_by_weight_otherwise():
    cfg = load_config("tiny_cpu", ["environments.math.weight=3", "environments.math.sft_weight=0.5",
                                   "environments.code.weight=2"])
    envs = sft_environments(cfg)
    assert envs["math"].weight == 0.5 and envs["code"].weight == 2 and envs["tool_use"].weight == 1
    assert cfg.environments["math"].weight == 3  # RL's mix is untouched
