"""RL raises a held-out pass rate on a real task, on the path the quick start runs.

`estuary train` as the demo runs it (asynchronous mode, the DeepSpeed learner, MTP drafting,
thinking budgets drawn per prompt and stated, a multi-turn tool_use environment beside the code
one), shortened: a brief warm-start SFT leaves the policy partly right at writing `max2` (the
code family whose solution it can already sometimes produce), then a few GRPO steps must raise
the held-out exact pass rate (fresh instances, seeds the rollouts never draw) by more than two
standard errors. A flipped advantage sign, a learner that never reaches the engines, or gradient
terms that ignore the reward leave it flat or make it fall.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from configs import load_config
from estuary.train import train

ROOT = Path(__file__).resolve().parents[2]

# Calibrated on the 2-core machine: after this SFT the policy writes a correct max2 for about
# half of the held-out instances, so GRPO has something to sharpen.
SFT_STEPS = 60
RL_STEPS = 20


def demo_path_config(tmp_path: Path, sft_steps: int = SFT_STEPS, rl_steps: int = RL_STEPS):
    """The quick start's config with two environments (code: `max2` only; tool_use: up to 2 turns)."""
    raw = yaml.safe_load((ROOT / "configs/tiny_cpu.yaml").read_text())
    raw["run"].update(name="learns", output_dir=str(tmp_path), max_steps=rl_steps, time_budget_s=0)
    code = {**raw["environments"]["code"], "kwargs": {"templates": ["max2"]}}
    tool = {**raw["environments"]["tool_use"], "kwargs": {"difficulty": 0, "max_turns": 2, "partial_credit": True}}
    raw["environments"] = {"code": code, "tool_use": tool}
    # Calibrated on the one-attention-layer preset without copy pretraining (max2 copies nothing
    # from its context); the demo's copy stage would add 90 s and leave less to sharpen.
    raw["model"].update(preset="tiny-hybrid-moe", draft_max_batch=0)  # drafts at every batch, as calibrated
    raw["rollout"]["budget"] = {"min_tokens": 8, "max_tokens": 32, "grace_tokens": 4}  # as calibrated
    # ... and before the demo's KL to the warm start, its 64-token answers, its informative mix and
    # its overlong filter (the KL slows a 20-step run; the bounded backlog and the mix change which
    # groups it sees).
    raw["learner"].update(kl_coef=0.0, overlong_filter=False)
    # (code's KL on its reference answers, `reference_kl_coef`, stays: added in session 37, it
    # passed at 148 s against 143 s before)
    raw["rollout"].update(mix="weight")
    raw["rollout"]["sampling"].update(max_new_tokens=48)
    raw["stream"].update(max_unread=0)
    code["concurrency"] = tool["concurrency"] = 8
    # No math here: no drills. Calibrated without the demo's copy and answer rows too (with them
    # the start's code pass@1 was 0.08, under the band this test needs).
    raw["sft"].update(steps=sft_steps, cache=False, copy_steps=0, answer_steps=0, drill_rows=0, copy_rows=0,
                      answer_rows=0)
    # Only code is asserted on: tool_use's held-out evaluation would add a minute and says nothing here.
    raw["eval"].update(instances=256, budgets=[], every_steps=0, environments=["code"])
    raw["learner"].update(checkpoint_every=0)
    path = tmp_path / "learns.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


@pytest.mark.timeout(900)  # about 5 minutes on an idle 2-core machine; more while it is shared
def test_grpo_raises_a_held_out_code_pass_rate_on_the_demo_path(tmp_path):
    cfg = demo_path_config(tmp_path)
    assert cfg.run.mode == "async" and cfg.learner.backend == "deepspeed" and cfg.model.mtp_steps > 0
    assert cfg.rollout.budget.max_tokens > 0 and cfg.environments["tool_use"].kwargs["max_turns"] > 1
    result = train(cfg)
    start, end = result.evals["start"]["code"], result.evals["end"]["code"]
    assert 0.1 < start["pass_at_1"] < 0.9, start  # partly right: the calibration still holds
    gain = end["pass_at_1"] - start["pass_at_1"]
    se = math.hypot(start["pass_at_1_se"], end["pass_at_1_se"])
    assert gain > 2 * se, (start, end)
