"""The learner's extra terms on a real tiny MoE policy: routing replay, balance, MTP, KL, proximal."""

from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from learner.batching import pack, pack_groups
from learner.losses import LossConfig, load_balance_loss
from learner.objective import (
    Objective,
    forward,
    logprobs_from_logits,
    microbatch_loss,
    policy_logprobs,
)
from learner.trainer import Trainer, TrainerOptions
from models.mtp import add_mtp_heads, mtp_distill_loss
from models.policy import init_policy
from models.routing import RouterTap, moe_routers
from rollout.torch_engine import TorchEngine
from rollout.types import Request, SamplingParams
from streams.trajectory import POLICY, PROMPT, Trajectory

sys.path.insert(0, str(Path(__file__).parent))
from test_worker import make_group  # noqa: E402


def _batch(policy, routing=False):
    group = make_group(0)
    return pack(group.samples, [1.0, -1.0, 0.5, -0.5], max_tokens=1000, routing=routing)[0]


def test_load_balance_loss_is_one_when_balanced_and_larger_when_skewed():
    logits = torch.zeros(4, 4)  # equal scores
    balanced = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    skewed = torch.tensor([[0, 1]] * 4)
    mask = torch.ones(4)
    assert load_balance_loss(logits, balanced, mask).item() == pytest.approx(1.0)
    skew_logits = torch.tensor([[4.0, 4.0, -4.0, -4.0]] * 4)  # scores follow the routing
    # f = (2, 2, 0, 0); P = (s, s, 1-2s...)/...: computed by hand below
    p = torch.sigmoid(skew_logits[0]) / torch.sigmoid(skew_logits[0]).sum()
    assert load_balance_loss(skew_logits, skewed, mask).item() == pytest.approx(float(2 * p[0] + 2 * p[1]))
    assert load_balance_loss(skew_logits, skewed, mask).item() > 1.0


def test_routing_replay_pins_the_experts_and_changes_log_probs_only_where_they_differ():
    policy = init_policy("tiny-hybrid-moe", seed=0)
    batch = _batch(policy)
    objective = Objective(routing_replay=True)
    with torch.no_grad():
        logits, _, tap, _ = forward(policy.model, policy.model, batch, Objective())
    own = logprobs_from_logits(logits, batch.input_ids)[0]
    layers = len(moe_routers(policy.model))
    b, t = batch.input_ids.shape
    recorded = torch.stack(tap.experts, dim=1).reshape(b, t, layers, -1).to(torch.int16)

    batch.routed = recorded  # the engine's routing equals the trainer's: identical log-probs
    with torch.no_grad():
        same = logprobs_from_logits(forward(policy.model, policy.model, batch, objective)[0], batch.input_ids)[0]
    assert torch.allclose(same, own, atol=1e-6)

    forced = recorded.clone()
    forced[0, 3] = (forced[0, 3] + 1) % policy.model.config.n_routed_experts  # other experts at one position
    forced[1] = -1  # unknown for row 1: the trainer routes it itself
    batch.routed = forced
    with torch.no_grad():
        logits2, _, tap2, _ = forward(policy.model, policy.model, batch, objective)
    replayed = logprobs_from_logits(logits2, batch.input_ids)[0]
    assert torch.equal(tap2.experts[0].reshape(b, t, -1)[0, 3].sort().values, forced[0, 3, 0].long().sort().values)
    assert not torch.allclose(replayed[0, 4:], own[0, 4:], atol=1e-6)  # later positions see the change
    assert torch.allclose(replayed[0, :4], own[0, :4], atol=1e-6)  # causal: earlier ones do not
    assert torch.allclose(replayed[1], own[1], atol=1e-6)


@pytest.mark.parametrize("steps", [1, 2])
def test_mtp_aux_loss_trains_the_heads(steps):
    """The heads' KL from the policy falls (through both draft steps at 2). The policy's
    distributions are made peaky (a random init's near-uniform ones leave the heads little to
    learn) and held still (advantages zero), so the target does not move under the heads."""
    policy = init_policy("tiny-hybrid-moe", seed=0)
    with torch.no_grad():
        policy.model.lm_head.weight.mul_(25.0)
    add_mtp_heads(policy.model, seed=0)
    batch = pack(make_group(0).samples, [0.0] * 4, max_tokens=1000)[0]
    objective = Objective(loss=LossConfig(is_correction="none"), mtp_coef=1.0, mtp_steps=steps)
    trainer = Trainer(policy.model, TrainerOptions(backend="torch", lr=3e-3))
    losses = [trainer.step([batch], objective)["mtp_loss"] for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_the_mtp_term_through_two_steps_trains_the_second_draft_step():
    """Both steps share one head, so training the first also helps the second; training through
    both (`mtp_steps=2`) must help it more: the second step reads the first's output, as drafts do."""
    second = []
    for steps in (1, 2):
        policy = init_policy("tiny-hybrid-moe", seed=0)
        with torch.no_grad():
            policy.model.lm_head.weight.mul_(25.0)
        add_mtp_heads(policy.model, seed=0)
        batch = pack(make_group(0).samples, [0.0] * 4, max_tokens=1000)[0]
        trainer = Trainer(policy.model, TrainerOptions(backend="torch", lr=3e-3))
        for _ in range(8):
            trainer.step([batch], Objective(loss=LossConfig(is_correction="none"), mtp_coef=1.0, mtp_steps=steps))
        with torch.no_grad():
            hidden = policy.model.model(batch.input_ids).last_hidden_state
            loss = partial(mtp_distill_loss, policy.model, batch.input_ids, hidden, batch.loss_mask)
            second.append(float(2 * loss(steps=2) - loss(steps=1)))  # the second step's own KL
    assert second[1] < 0.8 * second[0], second


def _moved_by_one_step(policy, objective: Objective, **options) -> set[str]:
    """Names of the weights that one step with all advantages zero changes.

    Weight decay is 0: AdamW would otherwise shrink every weight, gradient or not. With a zero
    gradient Adam's first update is exactly 0 (m = v = 0), so any change is a leaked gradient.
    """
    batch = pack(make_group(0).samples, [0.0] * 4, max_tokens=1000)[0]
    trainer = Trainer(policy.model, TrainerOptions(backend="torch", lr=1e-2, weight_decay=0.0, **options))
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    trainer.step([batch], objective)
    return {k for k, v in policy.model.state_dict().items() if not torch.equal(v, before[k])}


@pytest.mark.parametrize("steps", [1, 2])
def test_the_mtp_loss_moves_only_the_mtp_heads(steps):
    policy = init_policy("tiny-hybrid-moe", seed=0)
    add_mtp_heads(policy.model, seed=0)
    moved = _moved_by_one_step(policy, Objective(mtp_coef=1.0, mtp_steps=steps))
    assert moved and all(k.startswith("mtp.") for k in moved), sorted(k for k in moved if not k.startswith("mtp."))


def test_the_balance_loss_moves_only_the_routers():
    policy = init_policy("tiny-hybrid-moe", seed=0)
    gates = [r.weight for r in moe_routers(policy.model)]
    routers = {name for name, p in policy.model.named_parameters() if any(p is g for g in gates)}
    moved = _moved_by_one_step(policy, Objective(load_balance_coef=1.0), freeze_router=False)
    assert moved == routers, sorted(moved ^ routers)
    # with the routers frozen (the default) the balance loss has nothing of its own to move
    assert not _moved_by_one_step(init_policy("tiny-hybrid-moe", seed=0), Objective(load_balance_coef=1.0))


def test_minibatches_recompute_the_proximal_policy_so_the_clip_acts_on_later_steps():
    policy = init_policy("tiny-hybrid-moe", seed=0)
    batches = pack(make_group(0).samples + make_group(1).samples, [2.0, -2.0, 1.0, -1.0] * 2, max_tokens=20)
    assert len(batches) >= 4
    trainer = Trainer(policy.model, TrainerOptions(backend="torch", lr=5e-3))
    stats = trainer.train(batches, Objective(loss=LossConfig(is_correction="none")), minibatches=4)
    assert len(stats) == 4 and trainer.steps == 4
    assert all(b.prox_logp is not None for b in batches)
    assert stats[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # first step: current == proximal
    assert any(abs(s["ratio_mean"] - 1.0) > 1e-4 for s in stats[1:])  # later steps moved away


@pytest.mark.parametrize("estimator", ["k2", "full"])
def test_kl_to_the_reference_is_zero_at_start_and_grows(estimator):
    policy = init_policy("tiny-attention", seed=0)
    batch = _batch(policy)
    trainer = Trainer(policy.model, TrainerOptions(backend="torch", lr=5e-3, keep_reference=True))
    objective = Objective(loss=LossConfig(is_correction="none", kl_coef=0.1, kl_estimator=estimator))
    first = trainer.step([batch], objective)
    later = [trainer.step([batch], objective) for _ in range(3)]
    assert first["kl"] == pytest.approx(0.0, abs=1e-7) and later[-1]["kl"] > 1e-4


@pytest.mark.parametrize(("temperature", "top_p", "share"),
                         [(1.0, 1.0, False), (0.7, 1.0, False), (0.7, 0.8, False), (0.7, 0.8, True)])
def test_learner_logprobs_equal_the_engines_behaviour_logprobs(temperature, top_p, share):
    """Same weights, same sampler settings: the ratio to the behaviour policy must be 1."""
    policy = init_policy("tiny-hybrid-moe", seed=0)
    engine = TorchEngine(init_policy("tiny-hybrid-moe", seed=0), max_batch=4, max_len=128, seed=0)
    prompt = policy.tokenizer.apply_chat_template([{"role": "user", "content": "Compute 2 + 3."}],
                                                  add_generation_prompt=True, return_dict=False)
    params = SamplingParams(n=4, max_new_tokens=24, temperature=temperature, top_p=top_p)
    [samples] = engine.generate([Request(prompt, params)])
    n = len(prompt)
    trajectories = [Trajectory(np.array(prompt + s.token_ids), np.array([PROMPT] * n + [POLICY] * len(s.token_ids)),
                               np.array([0.0] * n + s.logprobs), np.array([-1] * n + s.versions)) for s in samples]
    [batch] = pack_groups([(trajectories, [0.0] * 4)], max_tokens=10_000, share_prompt=share)
    assert batch.prefix_len == (n if share else 0)  # the prompt, run once for the four rows
    objective = Objective(temperature=temperature, top_p=top_p)
    with torch.no_grad():
        learner = policy_logprobs(policy.model, policy.model, batch, objective)[0]
        loss, stats = microbatch_loss(policy.model, policy.model, batch, objective)
    sampled = batch.loss_mask.bool()
    assert sampled.sum() >= 8
    assert (learner[sampled] - batch.behav_logp[sampled]).abs().max().item() < 1e-4
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-4) and stats.get("outside_nucleus", 0.0) == 0.0


def test_top_p_training_keeps_gradients_finite_when_a_token_leaves_the_nucleus():
    policy = init_policy("tiny-hybrid-moe", seed=0)
    batch = _batch(policy)  # made-up tokens: many lie outside the policy's 0.5 nucleus
    trainer = Trainer(policy.model, TrainerOptions(backend="torch", lr=1e-3))
    stats = trainer.step([batch], Objective(temperature=0.7, top_p=0.5, loss=LossConfig(kl_coef=0.0)))
    assert 0.0 < stats["outside_nucleus"] < 1.0
    assert all(math.isfinite(v) for v in stats.values()) and stats["grad_norm"] > 0


def test_replay_with_the_wrong_layer_count_is_a_clear_error():
    policy = init_policy("tiny-hybrid-moe", seed=0)
    with pytest.raises(ValueError, match="MoE layers"):
        RouterTap(policy.model, replay=[torch.zeros(1, 2)])
    loss, stats = microbatch_loss(policy.model, policy.model, _batch(policy), Objective(load_balance_coef=0.01))
    assert stats["load_balance"] >= 1.0 - 1e-6 and torch.isfinite(loss)


def test_a_micro_batch_with_no_kl_term_skips_the_reference_and_trains_the_same():
    """Groups of an environment with `kl_coef: 0` need no reference pass; the update is unchanged."""
    updates, calls = [], []
    for skip in (True, False):
        policy = init_policy("tiny-hybrid-moe", seed=0)
        trainer = Trainer(policy.model, TrainerOptions(backend="torch", lr=1e-3, keep_reference=True))
        counted: list[int] = []
        trainer.reference.register_forward_pre_hook(lambda module, args, seen=counted: seen.append(1))
        for _ in range(2):  # the second step's KL is not zero: the weights have moved off the reference
            batches = [pack(make_group(g).samples, [1.0, -1.0, 0.5, -0.5], max_tokens=1000, kl_coefs=[kl] * 4)[0]
                       for g, kl in ((0, 0.0), (1, 0.2))]
            if not skip:  # a tiny coefficient instead of 0: the pass runs, its term adds ~nothing
                batches[0].kl_coef = torch.full_like(batches[0].kl_coef, 1e-12)
            stats = trainer.step(batches, Objective(loss=LossConfig(is_correction="none")))
        calls.append(len(counted))
        updates.append((policy.model.state_dict(), stats["kl"]))
    assert calls[0] < calls[1]  # the kl-free group made no reference pass
    for name, value in updates[0][0].items():
        assert torch.allclose(value, updates[1][0][name], atol=1e-6), name
    assert updates[0][1] > 0  # `kl` is over the rows the term applies to, not diluted by the others
