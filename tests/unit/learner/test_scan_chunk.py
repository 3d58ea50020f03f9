"""`learner.scan_chunk`: the learner's Mamba-2 scan runs in chunks of its own length on CPU, which
changes the speed and the rounding, not the maths."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from configs import ConfigError, load_config
from learner.batching import pack
from learner.losses import LossConfig
from learner.trainer import Trainer, TrainerOptions
from models.mamba_chunked import CHUNK, set_scan_chunk
from models.policy import init_policy

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import _sample  # noqa: E402


def _chunks(model) -> set[int]:
    return {m.chunk_size for m in model.modules() if type(m).__name__.endswith("Mamba2Mixer")}


def test_log_probs_of_a_sequence_longer_than_any_chunk_agree_across_chunk_lengths():
    policy = init_policy("tiny-hybrid-moe", seed=0)
    ids = torch.randint(0, 700, (2, 150), generator=torch.Generator().manual_seed(0))
    out = {}
    for chunk in (64, 16, 7):  # 150 tokens: 3, 10 and 22 chunks, the last one padded
        assert set_scan_chunk(policy.model, chunk) == 3
        out[chunk] = policy.model(ids).logits.log_softmax(-1)
    assert (out[64] - out[16]).abs().max() < 1e-4
    assert (out[64] - out[7]).abs().max() < 1e-4
    assert not torch.equal(out[64], out[16])  # the chunk did change how the sums were taken


def test_the_trainer_sets_the_chunk_on_cpu_and_a_step_trains_as_at_the_models_own():
    states = []
    for chunk in (0, 16):
        policy = init_policy("tiny-hybrid-moe", seed=0)
        samples = [_sample(policy, [5, 6, 7], list(range(40, 110))), _sample(policy, [5, 6], [50, 51, 52])]
        trainer = Trainer(policy.model, TrainerOptions(backend="torch", lr=1e-3, scan_chunk=chunk,
                                                       keep_reference=True))
        assert _chunks(policy.model) == _chunks(trainer.reference) == {chunk or CHUNK}  # 0: as loaded
        trainer.step(pack(samples, [1.0, -1.0], max_tokens=256), LossConfig(is_correction="none", kl_coef=0.1))
        states.append(policy.model.state_dict())
    for name, value in states[0].items():
        assert torch.allclose(value, states[1][name], atol=1e-5), name


def test_a_negative_chunk_is_refused():
    with pytest.raises(ConfigError, match="scan_chunk"):
        load_config("tiny_cpu", ["learner.scan_chunk=-1"])
