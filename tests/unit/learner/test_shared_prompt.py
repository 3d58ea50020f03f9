"""A group's prompt run once for its G rows: the same loss and gradients as the rows themselves."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from learner.batching import MIN_SHARED, pack, pack_groups, shared_prefix
from learner.losses import LossConfig
from learner.objective import Objective, microbatch_loss
from models.mtp import add_mtp_heads
from models.policy import init_policy
from streams.trajectory import POLICY, PROMPT, Trajectory


def _sample(gen, prompt: list[int], turns: int = 2) -> Trajectory:
    """prompt, then `turns` of (policy tokens, environment reply), the last reply left out."""
    ids, mask = list(prompt), [PROMPT] * len(prompt)
    for turn in range(turns):
        response = list(gen.integers(30, 200, int(gen.integers(3, 9))))
        ids += response
        mask += [POLICY] * len(response)
        if turn < turns - 1:
            reply = list(gen.integers(5, 200, int(gen.integers(2, 6))))
            ids += reply
            mask += [PROMPT] * len(reply)
    ids, mask = np.array(ids), np.array(mask, np.uint8)
    logp = np.where(mask == POLICY, -gen.uniform(3, 6, len(ids)), 0.0)
    return Trajectory(ids, mask, logp, np.where(mask == POLICY, 0, -1))


def _group(seed: int, g: int = 4, prompt_len: int = 20) -> list[Trajectory]:
    gen = np.random.default_rng(seed)
    prompt = list(gen.integers(5, 200, prompt_len))
    return [_sample(gen, prompt) for _ in range(g)]


def test_the_shared_prefix_is_the_prompt_and_never_reaches_a_policy_token():
    group = _group(0)
    assert shared_prefix(group) == 20
    same_start = [copy.deepcopy(s) for s in group]
    for s in same_start:  # every sample opens with the same two policy tokens: still not shared
        s.token_ids[20:22] = [77, 78]
    assert shared_prefix(same_start) == 20
    apart = [copy.deepcopy(s) for s in group]
    apart[2].token_ids[11] += 1  # the prompts differ at token 11
    assert shared_prefix(apart) == 11


def test_pack_groups_counts_the_prompt_once_and_leaves_short_prompts_as_rows():
    groups = [(_group(0, g=8, prompt_len=40), [1.0] * 8), (_group(1, prompt_len=MIN_SHARED - 1), [0.5] * 4)]
    batches = pack_groups(groups, max_tokens=10_000)
    assert [b.prefix_len for b in batches] == [40, 0]
    assert [b.input_ids.shape[0] for b in batches] == [8, 4]
    longest = max(len(s.token_ids) for s in groups[0][0])
    tight = pack_groups(groups[:1], max_tokens=40 + 4 * (longest - 40))  # room for 4 rows beside the prompt
    assert [b.input_ids.shape[0] for b in tight] == [4, 4] and all(b.prefix_len == 40 for b in tight)
    assert [b.prefix_len for b in pack_groups(groups[:1], 10_000, share_prompt=False)] == [0]


@pytest.mark.parametrize(("preset", "kl_estimator", "mtp_steps"),
                         [("tiny-hybrid-moe-2attn", "k2", 1), ("tiny-attention", "k2", 1),
                          ("tiny-hybrid-moe-2attn", "full", 2)])
def test_a_shared_prompt_gives_the_rows_loss_and_gradients(preset, kl_estimator, mtp_steps):
    """Mamba conv/SSM states and KV caches branched from one prompt pass, with the KL to a
    reference and (NemotronH) the MTP loss through one or two draft steps: equal to the rows
    within float32 rounding."""
    torch.manual_seed(0)
    policy = init_policy(preset, seed=0)
    model = policy.model.train()
    mtp = preset != "tiny-attention"
    if mtp:
        add_mtp_heads(model, seed=0)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a reference that differs: the KL term has a gradient
    objective = Objective(loss=LossConfig(kl_coef=0.1, kl_estimator=kl_estimator), mtp_coef=0.1 if mtp else 0.0,
                          mtp_steps=mtp_steps)
    group = (_group(3, g=6, prompt_len=24), [1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    results = []
    for batch in (pack(*group, max_tokens=10_000)[0], pack_groups([group], max_tokens=10_000)[0]):
        model.zero_grad(set_to_none=True)
        loss, stats = microbatch_loss(model, model, batch, objective, reference)
        loss.backward()
        results.append((batch.prefix_len, loss.detach(), stats,
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (p_rows, loss_rows, stats_rows, grads_rows), (p_shared, loss_shared, stats_shared, grads_shared) = results
    assert (p_rows, p_shared) == (0, 24)
    assert loss_shared.item() == pytest.approx(loss_rows.item(), rel=1e-5, abs=1e-6)
    assert stats_shared["kl"] == pytest.approx(stats_rows["kl"], rel=1e-4) and stats_rows["kl"] > 0
    if mtp:
        assert stats_shared["mtp_loss"] == pytest.approx(stats_rows["mtp_loss"], rel=1e-5)
    assert grads_rows.keys() == grads_shared.keys() and any(n.startswith("mtp.") for n in grads_rows) == mtp
    for name, g in grads_rows.items():
        scale = g.abs().max().item() + 1e-8
        assert (grads_shared[name] - g).abs().max().item() / scale < 1e-4, name


def test_a_shared_prompt_under_activation_checkpointing_is_refused_not_run_without_its_prompt():
    policy = init_policy("tiny-hybrid-moe", seed=0)
    policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.model.train()
    [batch] = pack_groups([(_group(0), [1.0, -1.0, 0.5, -0.5])], max_tokens=10_000)
    with pytest.raises(ValueError, match="share_prompt=false"):
        microbatch_loss(policy.model, policy.model, batch, Objective())


@pytest.mark.parametrize(("share", "top_p"), [(False, 1.0), (True, 0.8)])
def test_chunked_log_probs_give_the_whole_logits_loss_and_gradients(share, top_p):
    """The output head run 7 positions at a time (and again in backward) changes nothing."""
    torch.manual_seed(0)
    policy = init_policy("tiny-hybrid-moe", seed=0)
    model = policy.model.train()
    add_mtp_heads(model, seed=0)
    group = (_group(5, g=4, prompt_len=16), [1.0, -1.0, 0.5, -0.5])
    [batch] = pack_groups([group], max_tokens=10_000, share_prompt=share)
    results = []
    for chunk in (0, 7):
        objective = Objective(loss=LossConfig(is_correction="none"), mtp_coef=0.1, temperature=0.9, top_p=top_p,
                              logprob_chunk=chunk)
        model.zero_grad(set_to_none=True)
        loss, stats = microbatch_loss(model, model, batch, objective)
        loss.backward()
        results.append((loss.item(), stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_whole, stats_whole, grads_whole), (loss_chunked, stats_chunked, grads_chunked) = results
    assert loss_chunked == pytest.approx(loss_whole, rel=1e-5)
    assert stats_chunked["entropy"] == pytest.approx(stats_whole["entropy"], rel=1e-5)
    assert grads_whole.keys() == grads_chunked.keys() and "lm_head.weight" in grads_whole
    for name, g in grads_whole.items():
        assert torch.allclose(grads_chunked[name], g, rtol=1e-4, atol=1e-7), name
