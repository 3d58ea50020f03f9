"""A GRPO step on a tiny policy moves probability toward the better sample."""

from __future__ import annotations

import numpy as np
import torch

from learner.advantages import group_advantages
from learner.batching import pack, token_logprobs
from learner.losses import LossConfig
from learner.step import grpo_step
from models.policy import init_policy
from streams.trajectory import POLICY, PROMPT, Trajectory


def _sample(policy, prompt, response) -> Trajectory:
    ids = np.array(prompt + response)
    mask = np.array([PROMPT] * len(prompt) + [POLICY] * len(response), np.uint8)
    with torch.no_grad():
        lp = token_logprobs(policy.model, torch.from_numpy(ids[None].astype("int64")))[0].numpy()
    return Trajectory(token_ids=ids, loss_mask=mask, logprobs=np.where(mask == POLICY, lp, 0.0),
                      versions=np.where(mask == POLICY, 0, -1))


def test_packing_respects_the_token_budget():
    policy = init_policy("tiny-attention", seed=0)
    samples = [_sample(policy, [1, 2], [3] * n) for n in (3, 10, 4, 9)]
    batches = pack(samples, [1.0, -1.0, 0.5, 0.0], max_tokens=24)
    assert sum(b.input_ids.shape[0] for b in batches) == 4
    assert all(b.input_ids.numel() <= 24 or b.input_ids.shape[0] == 1 for b in batches)
    assert sum(b.n_tokens for b in batches) == 3 + 10 + 4 + 9


def test_grpo_step_raises_the_better_sample_and_lowers_the_worse():
    torch.manual_seed(0)
    policy = init_policy("tiny-hybrid-moe", seed=0)
    prompt = [5, 6, 7]
    good, bad = [40, 41, 42, 43], [50, 51, 52, 53]
    samples = [_sample(policy, prompt, good), _sample(policy, prompt, bad)]
    adv = group_advantages(torch.tensor([[1.0, 0.0]]), "grpo")[0].tolist()  # [+0.707, -0.707]
    opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-3)
    cfg = LossConfig(is_correction="none")

    def seq_logp(sample):
        with torch.no_grad():
            lp = token_logprobs(policy.model, torch.from_numpy(sample.token_ids[None].astype("int64")))[0]
        return float(lp[len(prompt):].sum())

    before = [seq_logp(s) for s in samples]
    history = [grpo_step(policy.model, opt, pack(samples, adv, max_tokens=8), cfg) for _ in range(5)]
    after = [seq_logp(s) for s in samples]
    assert after[0] > before[0] and after[1] < before[1]
    assert history[0]["trained_tokens"] == 8 and history[0]["grad_norm"] > 0
    # once the ratios leave the clip range, the clipped objective stops pushing
    assert history[-1]["clip_fraction"] > history[0]["clip_fraction"]
