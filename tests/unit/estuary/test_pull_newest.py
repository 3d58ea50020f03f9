"""The evaluation copy of the policy takes a published version whole, or refuses it loudly."""

from __future__ import annotations

import pytest
import torch

from configs.schema import Config
from estuary.train import WeightMismatch, _pull_newest, load_published
from models.mtp import add_mtp_heads
from models.policy import init_policy
from weights_sync.protocol import make_weight_sync


def _scaled(model, factor: float) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() * factor if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


def test_pull_newest_loads_every_weight_of_a_published_version(tmp_path):
    evaluator, learner = init_policy("tiny-hybrid-moe", seed=0), init_policy("tiny-hybrid-moe", seed=0)
    add_mtp_heads(learner.model)  # the learner publishes heads the evaluator does not hold: skipped
    publisher = make_weight_sync("local", str(tmp_path / "weights"))
    published = _scaled(learner.model, 2.0)
    publisher.publish(published, version=1)
    _pull_newest(Config(), tmp_path, evaluator)
    for name, value in evaluator.model.state_dict().items():
        torch.testing.assert_close(value, published[name])
    publisher.close()


def test_pull_newest_refuses_a_version_missing_a_policy_weight(tmp_path):
    evaluator = init_policy("tiny-hybrid-moe", seed=0)
    weights = _scaled(evaluator.model, 2.0)
    dropped = next(k for k in weights if "layers" in k)
    del weights[dropped]
    publisher = make_weight_sync("local", str(tmp_path / "weights"))
    publisher.publish(weights, version=1)
    with pytest.raises(WeightMismatch, match="1 policy weights missing") as error:
        _pull_newest(Config(), tmp_path, evaluator)
    assert dropped in str(error.value)
    publisher.close()


def test_load_published_refuses_unknown_weights_and_keeps_heads_a_version_lacks():
    policy = init_policy("tiny-hybrid-moe", seed=0)
    with pytest.raises(WeightMismatch, match="1 unknown"):
        load_published(policy.model, {**_scaled(policy.model, 1.0), "backbone.extra.weight": torch.zeros(1)})
    head = add_mtp_heads(policy.model)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    trunk = {k: v for k, v in _scaled(policy.model, 3.0).items() if not k.startswith("mtp.")}
    load_published(policy.model, trunk)  # an evaluator's heads are never drafted with: a version may omit them
    for name, value in head.state_dict().items():
        torch.testing.assert_close(value, before[name])
    torch.testing.assert_close(policy.model.lm_head.weight, trunk["lm_head.weight"])
