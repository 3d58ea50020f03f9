"""The starting policy's evaluation is reused only where it would come out the same."""

from __future__ import annotations

from configs.loader import load_config
from estuary.evaluate import evaluate
from estuary.start_eval import cache_dir, start_eval_key, start_evaluation
from models.policy import load_policy, write_preset


def _cfg(*extra: str):
    return load_config("tiny_cpu", ["eval.environments=[math]", "eval.instances=3", "eval.budgets=[8]",
                                    "rollout.sampling.max_new_tokens=8", *extra])


def _policy(tmp_path, seed: int = 0):
    return write_preset("tiny-hybrid-moe", tmp_path / f"policy{seed}", seed=seed)


def test_a_rerun_reuses_the_start_evaluation_and_it_equals_a_fresh_one(tmp_path, monkeypatch):
    monkeypatch.setenv("ESTUARY_CACHE", str(tmp_path / "cache"))
    cfg, policy_dir = _cfg(), _policy(tmp_path)
    computed: list[dict] = []

    def compute():
        computed.append(evaluate(load_policy(policy_dir), cfg.environments, cfg.eval, cfg.rollout, cfg.run.seed,
                                 only=cfg.eval.environments))
        return computed[-1]

    said: list[str] = []
    first = start_evaluation(cfg, policy_dir, compute, said.append)
    assert len(computed) == 1 and not said
    second = start_evaluation(cfg, policy_dir, compute, said.append)
    assert len(computed) == 1 and second == first and list(second) == ["math", "math:budget8"]
    assert any("reusing the cached evaluation" in s for s in said)
    # the premise: the same weights and settings score the same when evaluated again
    assert compute() == first


def test_every_input_the_evaluation_reads_changes_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("ESTUARY_CACHE", str(tmp_path / "cache"))
    policy_dir = _policy(tmp_path)
    base = start_eval_key(_cfg(), policy_dir)
    assert base is not None and start_eval_key(_cfg(), policy_dir) == base
    assert start_eval_key(_cfg(), _policy(tmp_path, seed=1)) != base  # other weights
    for change in ("eval.instances=5", "eval.budgets=[16]", "eval.seed_offset=7", "run.seed=1",
                   "rollout.sampling.temperature=0.7", "rollout.budget.grace_tokens=2", "model.dtype=bfloat16",
                   "environments.math.kwargs={difficulty: 1}", "environments.math.rewards=[]",
                   "environments.math.timeout_s=1"):
        assert start_eval_key(_cfg(change), policy_dir) != base, change
    # RL's settings for an environment's groups and the later evaluations' cadence are not read
    assert start_eval_key(_cfg("environments.math.weight=3", "environments.math.kl_coef=0",
                               "eval.every_steps=5", "learner.lr=1e-5"), policy_dir) == base


def test_off_for_a_users_checkpoint_and_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("ESTUARY_CACHE", str(tmp_path / "cache"))
    policy_dir = _policy(tmp_path)
    for off in (f"model.path={policy_dir}", "eval.cache_start=false", "sft.cache=false"):
        assert start_eval_key(_cfg(off), policy_dir) is None, off
        calls: list[int] = []

        def compute(calls=calls):
            calls.append(1)
            return {"math": {"reward": 0.5}}

        start_evaluation(_cfg(off), policy_dir, compute)
        start_evaluation(_cfg(off), policy_dir, compute)
        assert len(calls) == 2 and not list(cache_dir().glob("*.json"))


def test_a_damaged_entry_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("ESTUARY_CACHE", str(tmp_path / "cache"))
    cfg, policy_dir = _cfg(), _policy(tmp_path)
    start_evaluation(cfg, policy_dir, lambda: {"math": {"reward": 0.5}})
    (entry,) = cache_dir().glob("*.json")
    entry.write_text('{"math": ')
    assert start_evaluation(cfg, policy_dir, lambda: {"math": {"reward": 0.25}}) == {"math": {"reward": 0.25}}
    assert start_evaluation(cfg, policy_dir, lambda: {}) == {"math": {"reward": 0.25}}
