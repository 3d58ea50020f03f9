"""A GRPO step on a tiny policy moves probability toward the better sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.advantages import group_advantages
from learner.batching import pack
from learner.losses import LossConfig
from learner.objective import logprobs_from_logits
from learner.trainer import Trainer, TrainerOptions
from models.policy import init_policy
from streams.trajectory import POLICY, PROMPT, Trajectory


def token_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    return logprobs_from_logits(model(ids).logits, ids)[0]


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


def test_a_step_with_nothing_to_train_moves_no_weight_but_counts():
    policy = init_policy("tiny-hybrid-moe", seed=0)
    sample = _sample(policy, [1, 2], [3, 4, 5])
    sample.loss_mask[:] = PROMPT  # every policy token filtered out (a sample cut at the limit)
    trainer = Trainer(policy.model, TrainerOptions(backend="torch", lr=1e-3))
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    stats = trainer.step(pack([sample], [1.0], max_tokens=8), LossConfig())
    assert stats["trained_tokens"] == 0 and trainer.steps == 1  # the learner's version moves on
    assert all(torch.equal(before[k], v) for k, v in policy.model.state_dict().items())


def test_grpo_step_raises_the_better_sample_and_lowers_the_worse():
    torch.manual_seed(0)
    policy = init_policy("tiny-hybrid-moe", seed=0)
    prompt = [5, 6, 7]
    good, bad = [40, 41, 42, 43], [50, 51, 52, 53]
    samples = [_sample(policy, prompt, good), _sample(policy, prompt, bad)]
    adv = group_advantages(torch.tensor([[1.0, 0.0]]), "grpo")[0].tolist()  # [+0.707, -0.707]
    trainer = Trainer(policy.model, TrainerOptions(backend="torch", lr=1e-3))
    cfg = LossConfig(is_correction="none")

    def seq_logp(sample):
        with torch.no_grad():
            lp = token_logprobs(policy.model, torch.from_numpy(sample.token_ids[None].astype("int64")))[0]
        return float(lp[len(prompt):].sum())

    before = [seq_logp(s) for s in samples]
    history = [trainer.step(pack(samples, adv, max_tokens=8), cfg) for _ in range(5)]
    after = [seq_logp(s) for s in samples]
    assert after[0] > before[0] and after[1] < before[1]
    assert history[0]["trained_tokens"] == 8 and history[0]["grad_norm"] > 0
    # once the ratios leave the clip range, the clipped objective stops pushing
    assert history[-1]["clip_fraction"] > history[0]["clip_fraction"]


def test_deepspeed_zero2_step_matches_plain_torch():
    """ZeRO-2 over gloo on CPU, one process: the same update as the torch backend."""
    prompt, responses = [5, 6, 7], [[40, 41, 42], [50, 51, 52, 53, 54]]
    results = {}
    for backend in ("torch", "deepspeed"):
        policy = init_policy("tiny-hybrid-moe", seed=0)
        samples = [_sample(policy, prompt, r) for r in responses]
        trainer = Trainer(policy.model, TrainerOptions(backend=backend, zero_stage=2, lr=1e-3))
        # two micro-batches: the gradient-accumulation path is exercised too
        stats = trainer.step(pack(samples, [1.0, -1.0], max_tokens=8), LossConfig(is_correction="none"))
        results[backend] = ({k: v.detach().clone() for k, v in policy.model.state_dict().items()}, stats)
    (torch_state, torch_stats), (ds_state, ds_stats) = results["torch"], results["deepspeed"]
    assert ds_stats["loss"] == pytest.approx(torch_stats["loss"], rel=1e-5)
    initial = init_policy("tiny-hybrid-moe", seed=0).model.state_dict()
    assert any(not torch.equal(torch_state[k], initial[k]) for k in torch_state)  # the step did something
    for name in torch_state:
        assert torch.allclose(ds_state[name], torch_state[name], atol=1e-6), name


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_the_learning_rate_decays_with_the_runs_progress(backend):
    """`lr_decay_to`: at progress p the step's learning rate is lr * (1 - (1 - decay_to) * p), so
    a first Adam step (a move proportional to the lr) at the end of the run is decay_to times as big."""
    moves = {}
    for name, decay_to, progress in (("constant", 1.0, 1.0), ("end", 0.1, 1.0), ("half", 0.1, 0.5)):
        policy = init_policy("tiny-hybrid-moe", seed=0)
        before = torch.cat([p.detach().reshape(-1).clone() for p in policy.model.parameters()])
        trainer = Trainer(policy.model, TrainerOptions(backend=backend, lr=1e-3, lr_decay_to=decay_to))
        trainer.set_progress(progress)
        sample = _sample(policy, [5, 6, 7], [40, 41, 42])
        stats = trainer.step(pack([sample, _sample(policy, [5, 6, 7], [50, 51])], [1.0, -1.0], max_tokens=16),
                             LossConfig(is_correction="none"))
        moves[name] = torch.cat([p.detach().reshape(-1) for p in policy.model.parameters()]) - before
        assert stats["lr"] == pytest.approx(1e-3 * (1 - (1 - decay_to) * progress))
    assert moves["constant"].abs().max() > 1e-4
    assert torch.allclose(moves["end"], 0.1 * moves["constant"], atol=3e-7)  # float32 weights near 1
    assert torch.allclose(moves["half"], 0.55 * moves["constant"], atol=3e-7)


def test_the_driver_reports_progress_by_steps_or_time_whichever_is_nearer():
    import time

    from configs import load_config
    from estuary.train import _progress

    cfg = load_config("tiny_cpu", ["run.max_steps=100", "run.time_budget_s=100"])
    now = time.monotonic()
    assert _progress(cfg, 50, now - 10) == pytest.approx(0.5)
    assert _progress(cfg, 10, now - 80) == pytest.approx(0.8, abs=0.01)
    assert _progress(cfg, 10, now - 500) == 1.0
    assert _progress(load_config("tiny_cpu", ["run.max_steps=100", "run.time_budget_s=0"]), 30, now - 500) == 0.3


def test_router_is_frozen():
    policy = init_policy("tiny-hybrid-moe", seed=0)
    Trainer(policy.model, TrainerOptions(backend="torch"))
    gates = [p for n, p in policy.model.named_parameters() if ".gate." in n]
    assert gates and not any(p.requires_grad for p in gates)


def test_ppo_epochs_reuse_the_batch_and_the_clip_binds_from_the_second_step():
    """With one step per batch the decoupled ratio is identically 1; with two epochs the second
    step's ratio is taken against the weights before the batch, so the clip can bind."""
    from learner.objective import Objective

    torch.manual_seed(0)
    policy = init_policy("tiny-hybrid-moe", seed=0)
    prompt = [5, 6, 7]
    samples = [_sample(policy, prompt, [40, 41, 42, 43]), _sample(policy, prompt, [50, 51, 52, 53])]
    objective = Objective(loss=LossConfig(is_correction="none"), decoupled=True)
    trainer = Trainer(policy.model, TrainerOptions(backend="torch", lr=3e-2))
    once = trainer.train(pack(samples, [0.7, -0.7], max_tokens=8), objective)
    assert len(once) == 1 and once[0]["clip_fraction"] == 0.0
    twice = trainer.train(pack(samples, [0.7, -0.7], max_tokens=8), objective, epochs=2)
    assert len(twice) == 2 and trainer.steps == 3
    assert twice[0]["clip_fraction"] == 0.0 and twice[1]["clip_fraction"] > 0.0
