"""The Ray actor around `RolloutWorker`: builds the engine, stream and weight-sync reader in its process.

    actor = RolloutActor.options(num_cpus=1, max_restarts=-1).remote(spec)
    ref = actor.run.remote()        # rounds until actor.stop.remote()

Threaded (`max_concurrency=2`) so that `stop` and `counters` answer while `run` is busy. A
restarted actor (Ray brings it back after a crash) draws fresh prompt seeds instead of
replaying its first life's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import ray

from configs.runtime import SyncChannel
from configs.schema import EnvironmentConfig, ModelConfig, RolloutConfig, StreamConfig


@dataclass
class RolloutSpec:
    rollout: RolloutConfig
    envs: dict[str, EnvironmentConfig]
    model: ModelConfig
    policy_dir: str
    redis_url: str
    stream: StreamConfig
    sync: SyncChannel
    seed: int
    index: int = 0
    routing: bool = False
    seed_limit: int = 1_000_000


def build_worker(spec: RolloutSpec, reconstructed: bool = False):
    import torch

    from configs.runtime import quiet_libraries

    quiet_libraries()

    from rollout.engines import make_engine
    from rollout.worker import RolloutWorker
    from streams.redis_stream import TrajectoryStream

    torch.set_num_threads(max(1, int(spec.rollout.cpus_per_worker)))
    kwargs = {"max_batch": spec.rollout.max_concurrent_episodes, "max_len": spec.rollout.max_len,
              "seed": spec.seed, "mtp_steps": spec.model.mtp_steps, "draft_max_batch": spec.model.draft_max_batch,
              "draft_dtype": spec.model.draft_dtype}
    if spec.rollout.engine == "vllm":
        kwargs = {"max_model_len": spec.rollout.max_len, "max_num_seqs": spec.rollout.max_concurrent_episodes,
                  "seed": spec.seed, **spec.rollout.vllm_kwargs}
    engine = make_engine(spec.rollout.engine, spec.policy_dir, dtype=spec.model.dtype, **kwargs)
    stream = TrajectoryStream(spec.redis_url, key=spec.stream.key, consumer=f"rollout-{spec.index}",
                              max_len=spec.stream.max_len, max_unread=spec.stream.max_unread,
                              claim_idle_ms=spec.stream.claim_idle_ms)
    device = "cuda" if spec.rollout.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
    sync = spec.sync.open(rank=spec.index + 1, device=device)
    seed = spec.seed * 1009 + spec.index + (random.SystemRandom().randrange(1 << 30) if reconstructed else 0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.policy_dir)
    # The torch engine swaps weights between two decode steps from any thread, so a broadcast
    # receiver hands each version over the moment it is complete; others pull between groups.
    pushed = spec.sync.kind == "collective" and spec.rollout.engine == "torch"
    worker = RolloutWorker(spec.rollout, spec.envs, engine, tokenizer, stream, None if pushed else sync, seed=seed,
                           routing=spec.routing, seed_limit=spec.seed_limit)
    if pushed:
        def swap(update) -> None:
            engine.update_weights(update.weights, update.version)
            worker.counters["weight_updates"] += 1

        sync.subscribe(swap)
    return worker, sync


def wait_for_weights(sync, timeout_s: float, stopped=lambda: False) -> None:
    """Until a restarted engine has received a version by broadcast (the learner's next publication
    re-forms the group around it), or `timeout_s`: generating with the starting weights would
    only make groups the learner drops as stale."""
    import time

    deadline = time.monotonic() + timeout_s
    while sync.latest_version() < 0 and time.monotonic() < deadline and not stopped():
        time.sleep(0.1)


@ray.remote(max_concurrency=2)
class RolloutActor:
    def __init__(self, spec: RolloutSpec) -> None:
        import warnings

        with warnings.catch_warnings():  # Ray's own property trips its own deprecation warning
            warnings.simplefilter("ignore")
            reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        self.worker, self.sync = build_worker(spec, reconstructed)
        # Waited for in the first call, not here: the driver's calls to a restarting actor wait
        # for its constructor, and the learner publishes only once the driver goes on.
        self._await_weights = reconstructed and spec.sync.kind == "collective"

    def _weights_first(self) -> None:
        if self._await_weights:
            wait_for_weights(self.sync, timeout_s=120.0, stopped=self.worker.stop_event.is_set)
            self._await_weights = False

    def run(self, max_rounds: int | None = None) -> dict[str, int]:
        self._weights_first()
        return self.worker.run(max_rounds)

    def produce(self, groups: int) -> dict[str, int]:
        """Sync mode: rounds until at least `groups` more groups are published."""
        self._weights_first()
        target = self.worker.counters["groups"] + groups
        while self.worker.counters["groups"] < target:
            self.worker.round()
        return dict(self.worker.counters)

    def counters(self) -> dict[str, float]:
        """The worker's counters, and the torch engine's MTP drafting totals (`mtp/...`): drafts,
        acceptances, the crossover and the draft depth chosen per batch bucket."""
        engine = self.worker.engine
        mtp = {f"mtp/{k}": float(v) for k, v in getattr(engine, "stats", {}).items()}
        if getattr(engine, "mtp_steps", 0):
            mtp["mtp/crossover"] = float(engine.governor.crossover())
            mtp.update({f"mtp/depth_b{k}": float(d) for k, d in engine.governor.chosen().items()})
        return {**self.worker.counters, **mtp}

    def served(self) -> dict[str, float]:
        """The weights this engine holds: the version it serves, the newest it received, and the
        sum of the received version's floating-point weights (to compare with a checkpoint)."""
        update = self.sync.pull(newer_than=-1)
        total = 0.0 if update is None else sum(float(t.double().sum()) for t in update.weights.values()
                                               if t.is_floating_point())
        return {"version": self.worker.engine.version, "received": -1 if update is None else update.version,
                "weights_sum": total}

    def pid(self) -> int:
        import os

        return os.getpid()

    def stop(self) -> None:
        self.worker.stop()

    def node(self) -> str:
        """The Ray node this actor runs on (where the placement put it)."""
        return ray.get_runtime_context().get_node_id()
