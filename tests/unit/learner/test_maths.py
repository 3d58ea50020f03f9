"""Advantages and policy losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from learner.advantages import group_advantages, informative_groups, task_and_shaping_advantages
from learner.losses import LossConfig, aggregate, k2_kl, k3_kl, policy_loss


def test_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # mean 0.5, sample std sqrt(1/3)
    std = math.sqrt(1 / 3)
    assert group_advantages(r, "grpo", eps=0).tolist()[0] == pytest.approx([0.5 / std, -0.5 / std] * 1 + [-0.5 / std, 0.5 / std])
    # leave-one-out: 1 - mean(0, 0, 1) = 2/3; 0 - mean(1, 0, 1) = -2/3
    assert group_advantages(r, "loo").tolist()[0] == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    assert group_advantages(r, "drgrpo").tolist()[0] == pytest.approx([0.5, -0.5, -0.5, 0.5])
    with pytest.raises(ValueError, match="choose one of"):
        group_advantages(r, "ppo")


def test_zero_variance_groups_are_flagged():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert informative_groups(r).tolist() == [False, True, False]
    assert group_advantages(r, "grpo")[0].abs().max() == 0


def test_shaping_keeps_its_own_scale_and_correctness_stays_unit_sized():
    zero = torch.zeros(1, 4)
    format_only = torch.tensor([[0.1, 0.0, 0.1, 0.0]])  # all wrong; two closed their <think>
    adv = task_and_shaping_advantages(zero, format_only, "grpo")[0]
    assert adv.tolist() == pytest.approx([0.05, -0.05, 0.05, -0.05])  # 0.1 scale, not +-0.87
    malformed = torch.tensor([[-0.1, 0.0, 0.0, 0.0]])  # one malformed tool call
    assert task_and_shaping_advantages(zero, malformed)[0].tolist() == pytest.approx([-0.075, 0.025, 0.025, 0.025])
    right = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    shaping = torch.tensor([[0.1, 0.1, 0.0, 0.0]])
    unit = 0.5 / math.sqrt(1 / 3)  # 0.866: the grpo advantage of 1, 0, 1, 0
    adv = task_and_shaping_advantages(right, shaping, "grpo", eps=0)[0]
    assert adv.tolist() == pytest.approx([unit + 0.05, -unit + 0.05, unit - 0.05, -unit - 0.05])
    # no std scaling in loo and drgrpo: the split changes nothing there
    for kind in ("loo", "drgrpo"):
        assert torch.allclose(task_and_shaping_advantages(right, shaping, kind), group_advantages(right + shaping, kind))
    with pytest.raises(ValueError, match="choose one of"):
        task_and_shaping_advantages(right, shaping, "ppo")


def test_aggregation_token_vs_sequence():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert aggregate(per_token, mask, "token").item() == pytest.approx(8 / 5)  # all tokens equal
    assert aggregate(per_token, mask, "sequence").item() == pytest.approx((1 + 4) / 2)  # sequences equal


def _one_token(logp, behav, adv, cfg, prox=None):
    lp = torch.tensor([[logp]], requires_grad=True)
    loss, stats = policy_loss(lp, torch.tensor([[behav]]), torch.tensor([adv]), torch.ones(1, 1), cfg,
                              prox=None if prox is None else torch.tensor([[prox]]))
    return loss, stats, lp


def test_clip_and_clip_higher():
    cfg = LossConfig(clip_low=0.2, clip_high=0.28, is_correction="none")
    # ratio 1.5, positive advantage: clipped at 1.28 -> loss -1.28 * A, no gradient
    loss, stats, lp = _one_token(math.log(1.5), 0.0, 2.0, cfg)
    assert loss.item() == pytest.approx(-1.28 * 2.0)
    loss.backward()
    assert lp.grad.item() == 0.0 and stats["clip_fraction"] == 1.0
    # ratio 0.5, positive advantage: min picks the unclipped 0.5 * A (pessimistic), gradient flows
    loss, stats, lp = _one_token(math.log(0.5), 0.0, 2.0, cfg)
    assert loss.item() == pytest.approx(-0.5 * 2.0)
    loss.backward()
    assert lp.grad.item() == pytest.approx(-0.5 * 2.0)
    # ratio 0.5, negative advantage: clipped at 0.8 -> loss 0.8 * 1
    loss, _, _ = _one_token(math.log(0.5), 0.0, -1.0, cfg)
    assert loss.item() == pytest.approx(0.8)


def test_decoupled_and_truncated_importance_weights():
    # behaviour logp -1.0, proximal logp -0.2: w = exp(0.8) = 2.2255 > cap 2 -> truncated to 2
    cfg = LossConfig(is_correction="truncate", is_cap=2.0)
    loss, stats, _ = _one_token(-0.2, -1.0, 1.0, cfg, prox=-0.2)  # ratio to prox = 1
    assert loss.item() == pytest.approx(-2.0) and stats["is_weight_max"] == pytest.approx(2.0)
    cfg = LossConfig(is_correction="mask", is_cap=2.0)
    loss, stats, _ = _one_token(-0.2, -1.0, 1.0, cfg, prox=-0.2)
    assert loss.item() == 0.0  # masked out
    cfg = LossConfig(is_correction="mask", is_cap=3.0)
    loss, _, _ = _one_token(-0.2, -1.0, 1.0, cfg, prox=-0.2)
    assert loss.item() == pytest.approx(-math.exp(0.8))


def test_gspo_uses_the_sequence_ratio():
    cfg = LossConfig(ratio_level="sequence", aggregation="sequence", is_correction="none",
                     clip_low=10, clip_high=10)
    logp = torch.tensor([[math.log(2.0), math.log(0.5), 0.0]], requires_grad=True)
    behav = torch.zeros(1, 3)
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = policy_loss(logp, behav, torch.tensor([1.0]), mask, cfg)
    # geometric mean of ratios 2 and 0.5 is 1 -> loss -1, each token's grad -(1/2) * 1
    assert loss.item() == pytest.approx(-1.0)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-0.5, -0.5, 0.0])


def test_k3_kl():
    assert k3_kl(torch.tensor(0.0), torch.tensor(0.0)).item() == 0.0
    d = -0.5  # ref - logp
    assert k3_kl(torch.tensor(0.5), torch.tensor(0.0)).item() == pytest.approx(math.exp(d) - d - 1)
    cfg = LossConfig(is_correction="none", kl_coef=0.1, kl_estimator="k3")
    lp = torch.tensor([[0.0]], requires_grad=True)
    loss, stats = policy_loss(lp, torch.zeros(1, 1), torch.tensor([0.0]), torch.ones(1, 1), cfg,
                              ref_logp=torch.tensor([[-1.0]]))
    assert loss.item() == pytest.approx(0.1 * (math.exp(-1) + 1 - 1))
    assert stats["kl"] == pytest.approx(math.exp(-1))


def _kl_grad(estimator: str, logp: float, ref: float) -> float:
    """d(loss)/d(logp) of the KL term alone (zero advantage) for one token."""
    lp = torch.tensor([[logp]], requires_grad=True)
    loss, _ = policy_loss(lp, torch.tensor([[logp]]), torch.tensor([0.0]), torch.ones(1, 1),
                          LossConfig(is_correction="none", kl_coef=1.0, kl_estimator=estimator),
                          ref_logp=torch.tensor([[ref]]))
    loss.backward()
    return lp.grad.item()


def test_k2_kl_gradient_is_the_log_ratio_and_stays_bounded_where_k3s_explodes():
    # a token the reference gives 0.37 and RL pushed to 3e-7, sampled all the same
    far = dict(logp=-15.0, ref=-1.0)
    assert _kl_grad("k2", **far) == pytest.approx(-14.0)  # (logp - ref): pushes it back up, linearly
    assert _kl_grad("k3", **far) == pytest.approx(1 - math.exp(14.0))  # ~ -1.2e6: one token owns the step
    for logp, ref in ((-1.0, -1.05), (-2.0, -1.97), (-0.5, -0.5)):  # near the reference they agree
        assert _kl_grad("k2", logp, ref) == pytest.approx(_kl_grad("k3", logp, ref), abs=2e-3)
    with pytest.raises(ValueError, match="unknown KL estimator 'k1'; choose k2 or k3"):
        _kl_grad("k1", 0.0, 0.0)


def test_k2_kl_value_is_half_the_squared_log_ratio_and_kl_stat_stays_k3():
    lp = torch.tensor([[0.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])
    loss, stats = policy_loss(lp, lp.detach(), torch.tensor([0.0]), torch.ones(1, 2),
                              LossConfig(is_correction="none", kl_coef=0.1), ref_logp=ref)
    assert loss.item() == pytest.approx(0.1 * (0.5 * 1.0 + 0.5 * 4.0) / 2)
    assert stats["kl"] == pytest.approx(k3_kl(lp.detach(), ref).mean().item())


def test_full_kl_is_each_positions_exact_kl_and_sees_mass_no_sample_wrote():
    from learner.losses import full_kl

    torch.manual_seed(0)
    logits, ref_logits = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    kl = full_kl(logits, ref_logits, temperature=0.7)
    p, r = (logits / 0.7).softmax(-1), (ref_logits / 0.7).softmax(-1)
    exact = (p * (p.log() - r.log())).sum(-1)  # (2, 5): position t predicts token t + 1
    assert kl.shape == (2, 5) and torch.all(kl[:, 0] == 0)
    assert torch.allclose(kl[:, 1:], exact[:, :-1], atol=1e-5)
    assert full_kl(logits, logits).abs().max().item() < 1e-6
    # Every sample writes token 0 (the reference's 0.999); the policy has moved 0.1 of its mass
    # to token 1, which no sample wrote. The pull on token 1's logit: k2 sees it only through the
    # sampled token's small log-ratio, the whole-distribution KL through token 1's own (~4.6).
    ref = torch.log(torch.tensor([[[0.999, 0.0005, 0.0005]] * 2]))
    pol = torch.log(torch.tensor([[[0.9, 0.0995, 0.0005]] * 2])).requires_grad_(True)
    full_kl(pol, ref)[0, 1].backward()
    full_grad = pol.grad[0, 0, 1].item()
    pol.grad = None
    logp = torch.log_softmax(pol, -1)[0, 0, 0]  # the sampled token's log-prob
    k2_kl(logp, ref[0, 0, 0]).backward()
    assert full_grad > 0.4 and 0 < pol.grad[0, 0, 1].item() < full_grad / 20  # both push it down


def test_a_per_sequence_kl_coefficient_weighs_each_row_alone():
    """Per-environment `kl_coef`: a row with 0 gets no pull toward the reference, even when the
    config's coefficient is not 0; a row with c is pulled as a config coefficient of c would."""
    logp, ref, zeros = torch.tensor([[0.0], [0.0]]), torch.tensor([[-1.0], [-1.0]]), torch.zeros(2, 1)
    grads = {}
    for name, cfg_coef, rows in (("per_row", 0.1, torch.tensor([0.3, 0.0])), ("scalar", 0.3, None)):
        lp = logp.clone().requires_grad_(True)
        loss, _ = policy_loss(lp, zeros, torch.zeros(2), torch.ones(2, 1), LossConfig(is_correction="none",
                              kl_coef=cfg_coef), ref_logp=ref, kl_coef=rows)
        loss.backward()
        grads[name] = lp.grad[:, 0].tolist()
    assert grads["per_row"][1] == 0.0 and grads["per_row"][0] != 0.0
    assert grads["per_row"][0] == pytest.approx(grads["scalar"][0])
    # with a learner coefficient of 0 the per-row one still applies
    lp = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(lp, zeros, torch.zeros(2), torch.ones(2, 1), LossConfig(is_correction="none"),
                          ref_logp=ref, kl_coef=torch.tensor([0.3, 0.0]))
    assert loss.item() == pytest.approx(0.3 * 0.5 * 1.0 / 2)  # k2: half the squared log-ratio, over 2 tokens


def test_masked_tokens_do_not_count():
    cfg = LossConfig(is_correction="none")
    logp = torch.zeros(1, 3, requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 3), torch.tensor([1.0]), torch.tensor([[1, 0, 0]]), cfg)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-1.0, 0.0, 0.0])
