"""The weight average (`learner.ema_decay`): its arithmetic, what it leaves alone, and the trainer's
use of it (rank 0 keeps it; the live weights train as they would without it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from configs import load_config
from configs.errors import ConfigError
from learner.batching import pack
from learner.losses import LossConfig
from learner.trainer import Trainer, TrainerOptions
from learner.weight_average import WeightAverage
from models.policy import init_policy

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import _sample  # noqa: E402


def test_the_average_follows_the_weights_with_a_warmed_up_decay():
    model = torch.nn.Linear(2, 1)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    model.bias.requires_grad_(False)  # frozen: never averaged, never replaced
    average = WeightAverage(model, decay=0.9)
    assert average.rate() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): the start is forgotten at once
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.update(model)
    assert torch.allclose(average.shadow["weight"], torch.full((1, 2), 0.9))  # 0.1 * 0 + 0.9 * 1
    assert average.rate() == pytest.approx(2 / 11)
    for _ in range(200):
        average.update(model)
    assert average.rate() == 0.9  # capped at the decay
    assert "bias" not in average.shadow
    with torch.no_grad():
        model.bias.fill_(5.0)
    applied = average.applied(model.state_dict())
    assert torch.allclose(applied["weight"], torch.ones(1, 2)) and applied["bias"].item() == 5.0


def test_a_saved_average_must_match_the_model():
    average = WeightAverage(torch.nn.Linear(2, 1), decay=0.5)
    other = WeightAverage(torch.nn.Sequential(torch.nn.Linear(2, 1)), decay=0.5)
    with pytest.raises(ValueError, match="does not match the model"):
        average.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(torch.nn.Linear(2, 1), decay=1.0)


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_the_trainer_averages_its_steps_and_trains_as_it_would_without(backend):
    runs = {}
    for decay in (0.0, 0.5):
        policy = init_policy("tiny-hybrid-moe", seed=0)
        start = {k: v.clone() for k, v in policy.model.state_dict().items()}
        trainer = Trainer(policy.model, TrainerOptions(backend=backend, lr=1e-3, ema_decay=decay))
        for step in range(3):
            samples = [_sample(policy, [5, 6, 7], [40 + step, 41, 42]), _sample(policy, [5, 6, 7], [50, 51])]
            trainer.step(pack(samples, [1.0, -1.0], max_tokens=16), LossConfig(is_correction="none"))
        runs[decay] = (start, {k: v.clone() for k, v in policy.model.state_dict().items()},
                       trainer.averaged_state_dict())
    plain, (start, live, averaged) = runs[0.0], runs[0.5]
    assert all(torch.equal(plain[1][k], live[k]) for k in live)  # the average never touches training
    assert all(torch.equal(plain[2][k], plain[1][k]) for k in live)  # no average: the live weights
    moved = [k for k in live if not torch.equal(start[k], live[k])]
    assert moved and all(not torch.equal(averaged[k], live[k]) for k in moved)
    assert all(torch.equal(averaged[k], live[k]) for k in live if k not in moved)  # frozen routers, buffers


def test_the_weight_average_is_checked_in_config():
    assert load_config("tiny_cpu", ["learner.ema_decay=0.98"]).learner.ema_decay == 0.98
    for bad in ("learner.ema_decay=1.0", "learner.ema_decay=-0.1"):
        with pytest.raises(ConfigError, match=r"learner\.ema_decay=.* must be in \[0, 1\)"):
            load_config("tiny_cpu", [bad])
    with pytest.raises(ConfigError, match="zero_stage <= 2"):
        load_config("tiny_cpu", ["learner.ema_decay=0.9", "learner.zero_stage=3"])


def test_a_tied_weight_is_averaged_under_every_name():
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(4, 2)
            self.head = torch.nn.Linear(2, 4, bias=False)
            self.head.weight = self.embed.weight  # one parameter, two state-dict names

    model = Tied()
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    average.update(model)
    applied = average.applied(model.state_dict())
    assert set(applied) == {"embed.weight", "head.weight"}
    assert torch.equal(applied["embed.weight"], applied["head.weight"])
    assert not torch.equal(applied["head.weight"], model.head.weight)  # the average, not the live weight


def test_an_average_turned_on_at_resume_starts_at_the_restored_weights(tmp_path):
    from learner.checkpoint import restore_checkpoint, save_checkpoint

    policy = init_policy("tiny-hybrid-moe", seed=0)
    trainer = Trainer(policy.model, TrainerOptions(backend="torch", lr=1e-2))
    samples = [_sample(policy, [5, 6, 7], [40, 41, 42]), _sample(policy, [5, 6, 7], [50, 51])]
    trainer.step(pack(samples, [1.0, -1.0], max_tokens=16), LossConfig(is_correction="none"))
    path = save_checkpoint(tmp_path, policy, trainer, step=1, version=1)  # no average saved
    trained = {k: v.clone() for k, v in policy.model.state_dict().items()}

    fresh = init_policy("tiny-hybrid-moe", seed=0)
    resumed = Trainer(fresh.model, TrainerOptions(backend="torch", lr=1e-2, ema_decay=0.9))
    restore_checkpoint(path, fresh, resumed)
    averaged = resumed.averaged_state_dict()
    assert all(torch.equal(averaged[k], trained[k]) for k in trained)  # not the weights before restore
