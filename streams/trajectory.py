"""The trajectory-group schema and its compact, checked binary encoding.

A `TrajectoryGroup` is the G samples of one prompt. Each `Trajectory` holds the whole token
sequence (prompt, policy turns, environment/tool turns) with per-token arrays:

    token_ids (L,) int32      the sequence
    loss_mask (L,) uint8      PROMPT (0: prompt, environment or tool tokens), POLICY (1: sampled by
                              the policy), FORCED (2: forced by budget control, never trained on)
    logprobs  (L,) float32    behaviour log-prob of policy tokens (0 elsewhere)
    versions  (L,) int32      policy version that produced each policy token (-1 elsewhere)
    routed_experts (L, layers, k) int16, optional

Encoding: msgpack with one raw little-endian byte array per field for the whole group (samples
concatenated, with their lengths), never JSON lists of floats; `decode` checks the schema
version, dtypes, shapes, mask values and finiteness once per group, and raises
`TrajectoryDecodeError` naming the problem. Decoded arrays are read-only views of the payload.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

SCHEMA_VERSION = 1
PROMPT, POLICY, FORCED = 0, 1, 2

_ARRAYS = {"token_ids": np.int32, "loss_mask": np.uint8, "logprobs": np.float32, "versions": np.int32}


class TrajectoryDecodeError(ValueError):
    """A stream entry that is not a valid trajectory group; the message says what is wrong."""


@dataclass
class Trajectory:
    token_ids: np.ndarray
    loss_mask: np.ndarray
    logprobs: np.ndarray
    versions: np.ndarray
    reward: float = 0.0
    reward_parts: dict[str, float] = field(default_factory=dict)
    finish_reason: str = ""
    routed_experts: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name, dtype in _ARRAYS.items():
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=dtype))
        if self.routed_experts is not None:
            self.routed_experts = np.ascontiguousarray(self.routed_experts, dtype=np.int16)
        _check(self)

    @property
    def policy_tokens(self) -> int:
        return int((self.loss_mask == POLICY).sum())


@dataclass
class TrajectoryGroup:
    env_id: str
    prompt_id: str
    samples: list[Trajectory]
    group_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def min_version(self) -> int:
        """The oldest policy version among the group's policy tokens (-1 if none)."""
        versions = [int(s.versions[s.loss_mask == POLICY].min()) for s in self.samples
                    if (s.loss_mask == POLICY).any()]
        return min(versions) if versions else -1


def _check(t: Trajectory) -> None:
    n = t.token_ids.shape[0]
    for name in _ARRAYS:
        arr = getattr(t, name)
        if arr.ndim != 1 or arr.shape[0] != n:
            raise TrajectoryDecodeError(f"{name} has shape {arr.shape}; expected ({n},) like token_ids")
    if n and int(t.loss_mask.max()) > FORCED:
        raise TrajectoryDecodeError(f"loss_mask holds {int(t.loss_mask.max())}; allowed 0, 1, 2")
    if not np.isfinite(t.logprobs).all():
        raise TrajectoryDecodeError("logprobs holds NaN or inf")
    if (t.logprobs[t.loss_mask == POLICY] > 1e-4).any():
        raise TrajectoryDecodeError("a policy token has a log-prob above 0")
    if t.routed_experts is not None and (t.routed_experts.ndim != 3 or t.routed_experts.shape[0] != n):
        raise TrajectoryDecodeError(f"routed_experts has shape {t.routed_experts.shape}; expected ({n}, layers, k)")


def _pack_array(a: np.ndarray) -> dict:
    # A memoryview is packed as msgpack bin without the extra copy that tobytes() makes.
    return {"d": a.dtype.str, "s": list(a.shape), "b": memoryview(np.ascontiguousarray(a)).cast("B")}


def _unpack_array(obj: Any, name: str, expected: type | None) -> np.ndarray:
    try:
        dtype = np.dtype(obj["d"])
        arr = np.frombuffer(obj["b"], dtype=dtype).reshape(obj["s"])
    except (KeyError, TypeError, ValueError) as e:
        raise TrajectoryDecodeError(f"{name}: not an encoded array ({e})") from None
    if expected is not None and dtype != np.dtype(expected):
        raise TrajectoryDecodeError(f"{name} has dtype {dtype}; expected {np.dtype(expected)}")
    return arr


def encode(group: TrajectoryGroup) -> bytes:
    """One array per field for the whole group (samples concatenated) plus their lengths."""
    samples = group.samples
    arrays = {name: _pack_array(np.concatenate([getattr(s, name) for s in samples]) if samples
                                else np.zeros(0, dtype))
              for name, dtype in _ARRAYS.items()}
    experts = None
    if samples and all(s.routed_experts is not None for s in samples):
        experts = _pack_array(np.concatenate([s.routed_experts for s in samples]))
    return msgpack.packb({
        "v": SCHEMA_VERSION, "id": group.group_id, "env": group.env_id, "prompt": group.prompt_id,
        "t0": group.created_at, "timings": group.timings, "meta": group.metadata,
        "lengths": [len(s.token_ids) for s in samples], "rewards": [float(s.reward) for s in samples],
        "parts": [s.reward_parts for s in samples], "finish": [s.finish_reason for s in samples],
        "arrays": arrays, "experts": experts,
    }, use_bin_type=True)


def decode(data: bytes) -> TrajectoryGroup:
    """Parse and check an encoded group (arrays are read-only views of the payload)."""
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception as e:  # noqa: BLE001 - any malformed payload is reported, not raised as-is
        raise TrajectoryDecodeError(f"not msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise TrajectoryDecodeError("payload is not a mapping")
    if obj.get("v") != SCHEMA_VERSION:
        raise TrajectoryDecodeError(f"schema version {obj.get('v')!r}; this Estuary reads {SCHEMA_VERSION}")
    try:
        lengths = [int(n) for n in obj["lengths"]]
        arrays = {name: _unpack_array(obj["arrays"][name], name, dtype) for name, dtype in _ARRAYS.items()}
        experts = obj.get("experts")
        experts = None if experts is None else _unpack_array(experts, "experts", np.int16)
        whole = Trajectory(**arrays, routed_experts=experts)  # checks every array once
        if sum(lengths) != whole.token_ids.shape[0] or min(lengths, default=0) < 0:
            raise TrajectoryDecodeError(f"sample lengths {lengths} do not add up to {whole.token_ids.shape[0]}")
        samples, start = [], 0
        for i, n in enumerate(lengths):
            cut = slice(start, start + n)
            samples.append(_trusted(
                {name: arrays[name][cut] for name in _ARRAYS}, float(obj["rewards"][i]),
                dict(obj["parts"][i] or {}), str(obj["finish"][i]), None if experts is None else experts[cut]))
            start += n
        return TrajectoryGroup(env_id=str(obj["env"]), prompt_id=str(obj["prompt"]), samples=samples,
                               group_id=str(obj["id"]), created_at=float(obj["t0"]),
                               timings=dict(obj.get("timings") or {}), metadata=dict(obj.get("meta") or {}))
    except KeyError as e:
        raise TrajectoryDecodeError(f"missing field {e.args[0]!r}") from None
    except IndexError:
        raise TrajectoryDecodeError("per-sample lists are shorter than 'lengths'") from None
    except TrajectoryDecodeError:
        raise
    except (TypeError, ValueError) as e:
        raise TrajectoryDecodeError(f"malformed group ({e})") from None


def _trusted(arrays: dict[str, np.ndarray], reward: float, parts: dict, finish: str,
             experts: np.ndarray | None) -> Trajectory:
    """A Trajectory from slices of arrays that were checked as a whole (skips re-checking)."""
    t = object.__new__(Trajectory)
    t.__dict__.update(arrays, reward=reward, reward_parts=parts, finish_reason=finish,
                      routed_experts=experts)
    return t
