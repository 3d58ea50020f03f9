"""`learner.activation_checkpointing`: recomputing activations in backward changes memory, not the update."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from learner.batching import pack
from learner.losses import LossConfig
from learner.trainer import Trainer, TrainerOptions
from models.policy import init_policy

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import _sample  # noqa: E402


def test_a_step_with_activation_checkpointing_equals_one_without():
    states = []
    for checkpointing in (False, True):
        policy = init_policy("tiny-hybrid-moe", seed=0)
        samples = [_sample(policy, [5, 6, 7], r) for r in ([40, 41, 42], [50, 51, 52, 53, 54])]
        trainer = Trainer(policy.model, TrainerOptions(backend="torch", lr=1e-3,
                                                       activation_checkpointing=checkpointing))
        trainer.step(pack(samples, [1.0, -1.0], max_tokens=8), LossConfig(is_correction="none"))
        assert policy.model.is_gradient_checkpointing == checkpointing
        states.append(policy.model.state_dict())
    for name, value in states[0].items():
        assert torch.allclose(value, states[1][name], atol=1e-6), name
