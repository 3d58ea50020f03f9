"""Weight sync through Ray's object store: engines on any node of the cluster, zero-copy on the node.

    sync = RayObjectStoreWeightSync("run-name")    # same name on learner and engines
    sync.publish(state_dict, version)              # learner: one ray.put, then the registry points at it
    update = sync.pull(newer_than=engine.version)  # engine: newest version or None, never blocks long

The weights go into the object store once per version as numpy arrays (Ray reads those back
from shared memory without a copy on the same node, and moves them between nodes itself). A
small named registry actor holds (version, reference) of the newest publication: it keeps that
object alive until the next one replaces it, and since the reference is stored only once the
object is complete, a partial update is never served. Versions only go up.
"""

from __future__ import annotations

import numpy as np
import torch

from weights_sync.protocol import Update


class _Registry:
    """The newest (version, object ref); a Ray actor in use, a plain class in tests."""

    def __init__(self) -> None:
        self.version, self.ref = -1, None

    def set(self, version: int, ref_box: list) -> None:
        if version <= self.version:
            raise ValueError(f"version {version} is not newer than the published {self.version}")
        # The ref arrives boxed in a list so that Ray passes the reference, not the value.
        self.version, self.ref = version, ref_box[0]

    def latest(self) -> tuple[int, list]:
        return self.version, [self.ref]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the bits, restore on the other side
        return t.view(torch.int16).numpy()
    return t.numpy()


class RayObjectStoreWeightSync:
    def __init__(self, channel: str, namespace: str = "estuary") -> None:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("the `ray` weight-sync transport runs inside a Ray job; call estuary's init_ray first")
        self._ray = ray
        actor = ray.remote(num_cpus=0)(_Registry).options(
            name=f"estuary-weights:{channel}", namespace=namespace, get_if_exists=True, lifetime=None)
        self.registry = actor.remote()

    def publish(self, weights: dict[str, torch.Tensor], version: int) -> None:
        arrays = {name: _to_numpy(t) for name, t in weights.items()}
        dtypes = {name: str(t.dtype).removeprefix("torch.") for name, t in weights.items()}
        ref = self._ray.put({"arrays": arrays, "dtypes": dtypes})
        self._ray.get(self.registry.set.remote(version, [ref]))

    def latest_version(self) -> int:
        return self._ray.get(self.registry.latest.remote())[0]

    def _fetch(self, newer_than: int) -> tuple[int, dict] | None:
        version, (ref,) = self._ray.get(self.registry.latest.remote())
        if ref is None or version <= newer_than:
            return None
        return version, self._ray.get(ref)

    def pull_into(self, targets: dict[str, torch.Tensor], newer_than: int) -> int | None:
        """Copy the newest version straight from the object store into `targets`; returns it or None."""
        got = self._fetch(newer_than)
        if got is None:
            return None
        version, payload = got
        with torch.no_grad():
            for name, array in payload["arrays"].items():
                targets[name].copy_(_from_numpy(array, payload["dtypes"][name]))
        return version

    def pull(self, newer_than: int) -> Update | None:
        got = self._fetch(newer_than)
        if got is None:
            return None
        version, payload = got
        return Update(version, {name: _from_numpy(a, payload["dtypes"][name]).clone()
                                for name, a in payload["arrays"].items()})

    def close(self) -> None:
        pass  # the registry actor and the last object go with the Ray job


def _from_numpy(array: np.ndarray, dtype: str) -> torch.Tensor:
    # Object-store arrays are read-only views of shared memory: wrap them without copying and
    # without letting anyone write through them.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t
