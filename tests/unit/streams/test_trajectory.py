"""The trajectory schema: compact binary round trip, and clear errors for bad payloads."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest

from streams.trajectory import (
    FORCED,
    POLICY,
    PROMPT,
    Trajectory,
    TrajectoryDecodeError,
    TrajectoryGroup,
    decode,
    encode,
)


def make_group(n_samples: int = 4, length: int = 64, seed: int = 0, version: int = 3) -> TrajectoryGroup:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_samples):
        mask = np.full(length, POLICY, np.uint8)
        mask[: length // 4] = PROMPT
        mask[-1] = FORCED
        lp = np.where(mask == POLICY, -rng.random(length), 0.0)
        samples.append(Trajectory(token_ids=rng.integers(0, 700, length), loss_mask=mask, logprobs=lp,
                                  versions=np.where(mask == POLICY, version, -1), reward=float(rng.random()),
                                  reward_parts={"correct": 1.0}, finish_reason="stop",
                                  routed_experts=rng.integers(0, 8, (length, 2, 2))))
    return TrajectoryGroup(env_id="estuary/math", prompt_id=f"seed-{seed}", samples=samples)


def test_round_trip_is_exact():
    group = make_group()
    back = decode(encode(group))
    assert back.group_id == group.group_id and back.env_id == "estuary/math"
    for a, b in zip(group.samples, back.samples, strict=True):
        for name in ("token_ids", "loss_mask", "logprobs", "versions", "routed_experts"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert b.reward == a.reward and b.reward_parts == {"correct": 1.0}
    assert back.min_version == 3


def test_encoding_is_compact():
    group = make_group(n_samples=8, length=1024)
    fields = ("token_ids", "logprobs", "loss_mask", "versions", "routed_experts")
    as_json = json.dumps({"samples": [{k: getattr(s, k).tolist() for k in fields} for s in group.samples]})
    raw_bytes = sum(s.token_ids.nbytes + s.logprobs.nbytes + s.loss_mask.nbytes + s.versions.nbytes
                    + s.routed_experts.nbytes for s in group.samples)
    size = len(encode(group))
    assert size < 1.05 * raw_bytes + 2048
    assert size < len(as_json)


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o.update(v=99), "schema version"),
    (lambda o: o.pop("env"), "missing field 'env'"),
    (lambda o: o["arrays"]["logprobs"].update(b=b"\x00" * 8, s=[2]), "shape"),
    (lambda o: o["arrays"]["token_ids"].update(d="<f4"), "dtype"),
    (lambda o: o["arrays"]["logprobs"].update(b=np.full(256, np.nan, np.float32).tobytes()), "NaN"),
    (lambda o: o["arrays"]["loss_mask"].update(b=np.full(256, 7, np.uint8).tobytes()), "loss_mask"),
    (lambda o: o.update(lengths=[64, 64, 64, 65]), "add up"),
    (lambda o: o.update(rewards=[0.0]), "shorter"),
])
def test_bad_payloads_are_named(mutate, message):
    obj = msgpack.unpackb(encode(make_group()), raw=False)
    mutate(obj)
    with pytest.raises(TrajectoryDecodeError, match=message):
        decode(msgpack.packb(obj, use_bin_type=True))


def test_garbage_is_an_error_not_a_crash():
    with pytest.raises(TrajectoryDecodeError, match="msgpack|mapping"):
        decode(b"\xc1not msgpack")
    with pytest.raises(TrajectoryDecodeError, match="mapping"):
        decode(msgpack.packb([1, 2, 3]))
