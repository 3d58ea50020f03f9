"""`learner.reference_kl_coef`: the KL to the warm start on reference answers, every step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from configs.errors import ConfigError
from configs.schema import LearnerConfig
from learner.losses import full_kl
from learner.reference_kl import ReferenceSet, collate, reference_kl
from learner.trainer import Trainer, TrainerOptions
from learner.worker import LearnerWorker, objective_from
from models.policy import init_policy
from streams.redis_server import EmbeddedRedis
from streams.redis_stream import TrajectoryStream
from streams.trajectory import POLICY, PROMPT, Trajectory, TrajectoryGroup


def make_group(seed: int, rewards=(1.0, 0.0, 0.5, 0.0)) -> TrajectoryGroup:
    """G samples of one prompt with made-up tokens and log-probs."""
    gen = np.random.default_rng(seed)
    prompt = list(gen.integers(5, 60, 4))
    samples = []
    for r in rewards:
        ids = np.array(prompt + list(gen.integers(30, 90, 5)))
        mask = np.array([PROMPT] * 4 + [POLICY] * 5, np.uint8)
        logp = np.where(mask == POLICY, -gen.uniform(3, 6, len(ids)), 0.0)
        samples.append(Trajectory(ids, mask, logp, np.where(mask == POLICY, 0, -1), reward=r))
    return TrajectoryGroup("estuary/math", f"p{seed}", samples, group_id=f"g{seed}")


def _rows(n: int, envs=("estuary/code", "estuary/math")) -> list:
    """Made-up conversations: a 6-token prompt, then a 5-token answer (mask 1) per row."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(5, 90, (11,), generator=gen).tolist()
        rows.append((ids, [0] * 6 + [1] * 5, envs[i % len(envs)]))
    return rows


def test_reference_kl_is_the_mean_of_the_exact_kl_over_answer_positions():
    logits, ref = torch.randn(2, 7, 11), torch.randn(2, 7, 11)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]], dtype=torch.float)
    loss, per_row = reference_kl(logits, ref, mask, temperature=0.8)
    kl = full_kl(logits, ref, 0.8)
    assert loss.item() == pytest.approx(float((kl * mask).sum() / 7), rel=1e-6)
    assert per_row.tolist() == pytest.approx([float(kl[0, 2:5].mean()), float(kl[1, 3:].mean())], rel=1e-6)
    assert reference_kl(logits, logits, mask)[0].item() == pytest.approx(0.0, abs=1e-6)
    # per-environment coefficients weigh each row's sum; the plain per-row means are reported
    weighted, same = reference_kl(logits, ref, mask, 0.8, coefs=torch.tensor([0.5, 0.0]))
    assert weighted.item() == pytest.approx(float(0.5 * kl[0, 2:5].sum() / 7), rel=1e-6)
    assert torch.equal(same, per_row)


def test_draws_come_round_every_environment_and_pad_on_the_right():
    rows = _rows(6, envs=("a", "b", "c"))
    pool = ReferenceSet(rows, per_step=2, coefs={"a": 1.0, "b": 0.5, "c": 0.1, "d": 0.0}, seed=0)
    drawn = [row[2] for _ in range(3) for row in pool.draw()]
    assert drawn == ["a", "b", "c", "a", "b", "c"]
    ids, mask = collate([(list(range(1, 4)), [0, 1, 1], "a"), (list(range(1, 6)), [0, 0, 1, 1, 1], "b")], pad=0)
    assert ids.tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]] and mask.sum().item() == 5
    with pytest.raises(ValueError, match="reference conversations"):
        ReferenceSet(rows, per_step=2, coefs={"d": 1.0})  # no row of an environment with a coefficient


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def test_at_the_warm_start_the_term_moves_nothing_and_a_flipped_answer_token_comes_back():
    """Zero advantages, no on-policy KL: with the policy equal to its reference the step changes no
    weight (the term's gradient is exactly 0 there). Then a near-certain answer token of the pool
    loses its mass to another token (the form code's collapses took): the term alone brings it back."""
    torch.manual_seed(0)
    policy = init_policy("tiny-attention", seed=0)
    rows = _rows(4)
    ids, _ = collate(rows[:1], 0)
    position, token, other = 8, rows[0][0][8], rows[0][0][8] + 1  # an answer token, predicted at 7
    with torch.no_grad():  # the warm start is sure of it there, as of a skeleton token like `):`
        hidden = policy.model.model(ids).last_hidden_state[0, position - 1]
        policy.model.lm_head.weight[token] += 30 * hidden / hidden.norm() ** 2
    trainer = Trainer(policy.model, TrainerOptions(backend="torch", lr=1e-3, weight_decay=0.0, keep_reference=True))
    pool = ReferenceSet(rows, per_step=4, coefs={"estuary/code": 1.0, "estuary/math": 1.0}, seed=0)
    objective = objective_from(LearnerConfig(backend="torch", kl_coef=0.0))

    def extra(module, model, reference, device):
        return pool.loss(module, model, reference, 1.0, device)

    def p_token() -> float:
        with torch.no_grad():
            return torch.softmax(policy.model(ids).logits[0, position - 1], -1)[token].item()

    batches = _pack_zero_advantage()
    before, p0 = _weights(policy.model), p_token()
    report = trainer.step(batches, objective, extra)
    assert torch.equal(before, _weights(policy.model)) and report["reference_kl"] == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():  # the flip: its mass goes to `other`
        head = policy.model.lm_head.weight
        head[[token, other]] = head[[other, token]].clone()
    flipped = p_token()
    kls = [trainer.step(batches, objective, extra)["reference_kl"] for _ in range(30)]
    assert p0 > 0.9 and flipped < 0.01 and kls[-1] < kls[0] / 3, (p0, flipped, kls)
    assert p_token() > 0.3, (p0, flipped, p_token())  # from 1e-13: 0.41 measured


def _pack_zero_advantage():
    from learner.batching import pack

    group = make_group(7, rewards=(0.0,) * 4)
    return pack(group.samples, [0.0] * 4, 256, 0)


def test_the_learner_logs_the_term_per_environment_and_config_checks_it(tmp_path):
    from dataclasses import replace

    cfg = LearnerConfig(backend="torch", lr=1e-3, groups_per_step=1, micro_batch_tokens=256, checkpoint_every=0,
                        reference_kl_coef=0.1, reference_kl_rows=2)
    with EmbeddedRedis() as server:
        TrajectoryStream(server.url, consumer="rollout").publish(make_group(0))
        stream = TrajectoryStream(server.url, consumer="learner-0")
        worker = LearnerWorker(cfg, init_policy("tiny-attention", seed=0), stream, tmp_path, reference_rows=_rows(4))
        assert worker.trainer.reference is not None  # kept for this term though kl_coef is 0
        report = worker.step(timeout_s=10)
    assert {"reference_kl", "reference_kl/code", "reference_kl/math"} <= set(report.stats)
    with pytest.raises(ValueError, match="reference conversations"):
        LearnerWorker(cfg, init_policy("tiny-attention", seed=0), None, tmp_path / "none")
    # an environment's own coefficient: only its rows, with the learner's coefficient at 0
    code_only = LearnerWorker(replace(cfg, reference_kl_coef=0.0), init_policy("tiny-attention", seed=0), None,
                              tmp_path / "code", env_reference_kl_coef={"estuary/code": 0.3}, reference_rows=_rows(4))
    assert code_only.reference_set.envs == ["estuary/code"] and code_only.trainer.reference is not None
    with pytest.raises(ConfigError, match="reference_kl_coef"):
        LearnerConfig(reference_kl_coef=-1.0)


def test_the_pool_is_the_reference_answers_of_environments_with_a_coefficient():
    """`reference_source`: the environments whose coefficient (theirs, else the learner's) is > 0, and
    each row's mask covers the assistant's reference answer and nothing of the prompt."""
    from dataclasses import replace

    from configs.loader import load_config
    from estuary.run_setup import reference_source

    cfg = load_config("configs/tiny_cpu.yaml", ["learner.reference_kl_coef=0.1",
                                                "environments.long_context.reference_kl_coef=0"])
    source = reference_source(cfg)
    assert sorted(source.envs) == ["code", "math", "tool_use"] and source.seed_limit == cfg.eval.seed_offset
    only = reference_source(load_config("configs/tiny_cpu.yaml", ["learner.reference_kl_coef=0",
                                                                  "environments.code.reference_kl_coef=0.3"]))
    assert sorted(only.envs) == ["code"]
    assert reference_source(load_config("configs/tiny_cpu.yaml", ["learner.reference_kl_coef=0",
                                                                  "environments.code.reference_kl_coef=0"])) is None
    from estuary.run_setup import check_run_config

    off = [f"environments.{n}.reference_kl_coef=0" for n in ("math", "code", "tool_use", "long_context")]
    with pytest.raises(ConfigError, match="no environment"):
        check_run_config(load_config("configs/tiny_cpu.yaml", ["learner.reference_kl_coef=0.1", *off]))
    tokenizer = init_policy("tiny-attention", seed=0).tokenizer
    rows = replace(source, envs={"math": source.envs["math"]}, per_env=3).rows(tokenizer)
    assert len(rows) == 3 and {r[2] for r in rows} == {"estuary/math"}
    for ids, mask, _ in rows:
        answer = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m], skip_special_tokens=True)
        prompt = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
        assert "\\boxed{" in answer and prompt.rstrip().endswith("assistant"), (prompt, answer)
