"""The learner loop as a plain class: stream -> filters -> GRPO step -> publish -> checkpoint -> ack.

    worker = LearnerWorker(cfg.learner, policy, stream, run_dir, sync=make_weight_sync(...))
    while worker.version < cfg.run.max_steps:
        report = worker.step(timeout_s=5)     # None when not enough groups arrived in time
    worker.finish()                           # final checkpoint, acknowledges the rest

With several data-parallel ranks (`WORLD_SIZE` > 1) rank 0 alone reads the stream and hands each
rank a share of the step's `groups_per_step` groups (balanced by tokens); all ranks train one
DeepSpeed step together, rank 0 publishes, and rank 0 acknowledges only after every rank's
checkpoint shard is written.

What one step does, in order:
1. Read trajectory groups until `groups_per_step` usable ones are in hand. A group is dropped
   (and counted) when it is staler than `max_staleness` versions (per environment where the
   environment sets its own; `stale_policy: downweight` scales its advantages instead) or, with
   dynamic sampling, when all its rewards are equal (zero advantage: no signal). A group whose
   rewards differ only by shaping is kept: its advantages stay on the shaping's scale. With
   `kl_anchor_groups`, up to that many of the zero-variance groups join the step with zero
   advantage for the KL term alone (they do not count towards `groups_per_step`).
2. Advantages per group, from the task reward (the `correct` part) with the shaping terms
   (every other part) added on their own scale (`task_and_shaping_advantages`); samples cut
   at the length limit are left out with `overlong_filter` (no token of theirs would train);
   micro-batches packed by `micro_batch_tokens`.
3. `epochs` x `minibatches` optimizer steps (the policy version counts optimizer steps).
4. Publish the weights every `publish_every` steps; engines pull them when ready.
5. Commit: every `checkpoint_every` steps a checkpoint records the step, the version and the
   stream entries trained on since the previous one; only then are those entries acknowledged
   (dropped groups are acknowledged at once, their ids and reasons kept in the stream's
   `<key>:dropped`: they change no weights), and `checkpoints/commits/` keeps, for the whole
   run, which groups each committed checkpoint consumed.
   A learner killed in between restarts from the checkpoint, and the stream hands it back, in
   order, the entries it had read and not acknowledged, so the lost steps are re-trained on the
   same data and nothing is trained twice. With `checkpoint_every: 0` entries are acknowledged
   after each step (an in-memory commit: a crash then loses the steps since the start).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from configs.schema import LearnerConfig
from learner.advantages import task_and_shaping_advantages
from learner.batching import MicroBatch, pack, pack_groups
from learner.checkpoint import latest_checkpoint, record_commit, restore_checkpoint, save_checkpoint
from learner.collectives import gather_to_all, scatter_from_rank0
from learner.losses import LossConfig
from learner.objective import Objective
from learner.reference_kl import ReferenceSet
from learner.trainer import Trainer, TrainerOptions
from models.policy import Policy
from streams.redis_stream import Entry, TrajectoryStream
from streams.trajectory import Trajectory, TrajectoryGroup


@dataclass
class StepReport:
    """One optimizer step, as the learner reports it (and, summarised, as the driver logs it)."""

    version: int
    """Policy version after the step (optimizer steps so far)."""
    stats: dict[str, float]
    """Token-weighted training statistics over every rank (loss, grad_norm, trained_tokens, ...)."""
    groups: list[TrajectoryGroup]
    """The groups trained on; empty once `summarised` (the driver never moves trajectories)."""
    staleness: list[int] = field(default_factory=list)
    """Policy versions each trained group lagged behind, one per group."""
    group_ids: list[str] = field(default_factory=list)
    """Ids of the trained groups (what each version was trained on)."""
    group_metrics: dict[str, float] = field(default_factory=dict)
    """Per-environment rollout metrics of the trained groups (`learner.metrics.group_metrics`)."""
    counters: dict[str, float] = field(default_factory=dict)
    """The learner's running counters (groups read, dropped stale, dropped zero-variance, ...)."""
    stream_depth: int = 0
    """Unacknowledged entries in the trajectory stream after the step."""
    samples: list[dict] = field(default_factory=list)
    """A few decoded samples (step, env, reward, text) for the run's sample table."""


def objective_from(cfg: LearnerConfig, mtp_coef: float = 0.0, temperature: float = 1.0, top_p: float = 1.0,
                   top_k: int = 0, mtp_steps: int = 1) -> Objective:
    """The learner's objective; `temperature`, `top_p`, `top_k` are the sampler's (rollout.sampling)."""
    loss = LossConfig(clip_low=cfg.clip_low, clip_high=cfg.clip_high, aggregation=cfg.loss_aggregation,
                      ratio_level=cfg.ratio_level, is_correction=cfg.is_correction, is_cap=cfg.is_cap,
                      kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator)
    return Objective(loss=loss, decoupled=cfg.decoupled, load_balance_coef=cfg.load_balance_coef,
                     mtp_coef=mtp_coef, mtp_steps=mtp_steps, routing_replay=cfg.routing_replay, temperature=temperature,
                     top_p=top_p, top_k=top_k, logprob_chunk=cfg.logprob_chunk)


def task_and_shaping(group: TrajectoryGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's rewards split into task (the `correct` part) and shaping (the rest): (1, G) each.

    A sample without a `correct` part (a failed episode, a hand-made trajectory) counts its
    whole reward as task reward.
    """
    task = [s.reward_parts.get("correct", s.reward) for s in group.samples]
    shaping = [s.reward - t for s, t in zip(group.samples, task, strict=True)]
    return torch.tensor([task], dtype=torch.float32), torch.tensor([shaping], dtype=torch.float32)


def split_by_tokens(kept: list, ranks: int) -> list[list]:
    """`kept` (entry, scale, staleness) split into `ranks` shares of about equal token counts
    (largest group first onto the lightest share); a share may be empty."""
    shares: list[list] = [[] for _ in range(ranks)]
    load = [0] * ranks
    for item in sorted(kept, key=lambda k: -sum(len(s.token_ids) for s in k[0].group.samples)):
        lightest = load.index(min(load))
        shares[lightest].append(item)
        load[lightest] += sum(len(s.token_ids) for s in item[0].group.samples)
    return shares


class LearnerWorker:
    def __init__(self, cfg: LearnerConfig, policy: Policy, stream: TrajectoryStream, run_dir: str | Path,
                 sync=None, env_staleness: dict[str, int] | None = None, mtp_coef: float = 0.0,
                 mtp_steps: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 env_kl_coef: dict[str, float] | None = None,
                 env_overlong_filter: dict[str, bool] | None = None,
                 env_reference_kl_coef: dict[str, float] | None = None,
                 reference_rows: list | None = None) -> None:
        self.cfg, self.policy, self.stream, self.sync = cfg, policy, stream, sync
        self.run_dir = Path(run_dir)
        self.env_staleness = env_staleness or {}
        self.env_kl_coef = env_kl_coef or {}  # per-environment overrides of cfg.kl_coef
        self.env_overlong_filter = env_overlong_filter or {}  # ... and of cfg.overlong_filter
        # `reference_kl_coef` per environment of the reference rows (`learner/reference_kl.py`)
        overrides = env_reference_kl_coef or {}
        anchor_coefs = {row[2]: overrides.get(row[2], cfg.reference_kl_coef) for row in reference_rows or []}
        if cfg.reference_kl_coef > 0 and not reference_rows:
            raise ValueError("learner.reference_kl_coef > 0 needs reference conversations: no environment "
                             "with a weight > 0 and a reference_kl_coef > 0 gave one")
        # The engines' sampler settings: the learner's log-probs must be of the same distribution.
        self.objective = objective_from(cfg, mtp_coef, temperature, top_p, top_k, mtp_steps)
        self.trainer = Trainer(policy.model, TrainerOptions(
            backend=cfg.backend, zero_stage=cfg.zero_stage, lr=cfg.lr, weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_steps, lr_decay_to=cfg.lr_decay_to, max_grad_norm=cfg.max_grad_norm, freeze_router=cfg.freeze_router,
            keep_reference=max([cfg.kl_coef, *self.env_kl_coef.values(), *anchor_coefs.values()]) > 0,
            activation_checkpointing=cfg.activation_checkpointing, ema_decay=cfg.ema_decay,
            scan_chunk=cfg.scan_chunk))
        self.reference_set = None  # `reference_kl_coef`: reference answers whose KL to the warm start trains
        if any(c > 0 for c in anchor_coefs.values()):
            self.reference_set = ReferenceSet(reference_rows, cfg.reference_kl_rows, anchor_coefs,
                                              seed=self.trainer.rank, pad=policy.tokenizer.pad_token_id or 0)
        if self.trainer.rank != 0:
            # Rank 0 alone reads the stream and hands each rank its share: no rank can claim
            # another's uncommitted entries, and the stream's consumer is the same as one learner's.
            self.stream = None
        self.version = 0
        self.counters: Counter[str] = Counter()
        self._uncommitted: list[Entry] = []  # trained on since the last commit
        self._waited = 0.0  # seconds spent waiting for groups since the last step
        self._kept: list[tuple[Entry, float, int]] = []  # usable groups waiting for a step
        self._committed: tuple[int, Path] | None = None  # (version, path) of the newest checkpoint
        self._resume()
        self.publish()

    # -- commit and resume ---------------------------------------------------------------------
    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return
        meta = restore_checkpoint(path, self.policy, self.trainer)
        self.version = int(meta["version"])
        self._committed = (self.version, path)
        self.counters.update(meta.get("counters", {}))
        consumed = meta["rank"].get("stream", {})
        # The kill may have come between writing the checkpoint and recording or acknowledging
        # its entries.
        if self.stream is not None:
            record_commit(self.run_dir, int(meta["step"]), consumed)
            self.stream.ack_ids(consumed.get("entries", []))

    def checkpoint(self) -> Path:
        """Commit: write a checkpoint naming the consumed entries, then acknowledge them."""
        consumed = {"entries": [e.entry_id for e in self._uncommitted],
                    "groups": [e.group.group_id for e in self._uncommitted]}
        path = save_checkpoint(self.run_dir, self.policy, self.trainer, step=self.version, version=self.version,
                               extra={"counters": dict(self.counters)}, rank_extra={"stream": consumed})
        if self.stream is not None:  # rank 0: acknowledged only once every rank's shard is written
            record_commit(self.run_dir, self.version, consumed)
            self.stream.ack(self._uncommitted)
        self._uncommitted = []
        self._committed = (self.version, path)
        return path

    def publish(self) -> float:
        """Offer the current weights to the engines; returns the seconds it took (0 without a sync)."""
        start = time.perf_counter()
        state = self.trainer.full_state_dict() if (self.sync is not None or self.trainer.world_size > 1) else None
        if self.sync is None or state is None:  # only rank 0 publishes
            return 0.0
        if self.sync.latest_version() >= self.version:
            # A resumed learner re-trains steps whose versions the engines already hold; it
            # publishes again from the first version past them (versions only go up).
            return 0.0
        self.sync.publish(state, self.version)
        return time.perf_counter() - start

    def finish(self) -> Path:
        """The final checkpoint. A learner with nothing trained since its newest checkpoint (one
        restarted during the driver's last call) returns that one: writing the same step again
        would replace the folder `LATEST` names, and a kill in between would lose every step."""
        if self._committed is not None and self._committed[0] == self.version:
            return self._committed[1]
        return self.checkpoint()

    # -- one step ------------------------------------------------------------------------------
    def _admit(self, group: TrajectoryGroup) -> tuple[bool, float, int, str]:
        """(usable, advantage scale, staleness, why dropped) of a group at the current version."""
        staleness = self.version - group.min_version if group.min_version >= 0 else 0
        limit = self.env_staleness.get(group.env_id, self.cfg.max_staleness)
        scale = 1.0
        if staleness > limit:
            if self.cfg.stale_policy == "drop":
                self.counters["dropped_stale"] += 1
                return False, 0.0, staleness, "stale"
            scale = 1.0 / (1 + staleness - limit)  # older data counts less, never nothing
            self.counters["downweighted_stale"] += 1
        rewards = [s.reward for s in group.samples]
        if len(rewards) < 2 or (self.cfg.dynamic_sampling and max(rewards) - min(rewards) < 1e-9):
            self.counters["dropped_zero_variance"] += 1
            return False, 0.0, staleness, "zero_variance"
        return True, scale, staleness, ""

    def collect(self, timeout_s: float | None) -> list[tuple[Entry, float, int]] | None:
        """Usable groups for one step, or None if they did not arrive within `timeout_s` (0: take
        what the stream holds now, without waiting: sync mode, whose rollouts are done)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        anchors: list[Entry] = []  # zero-variance groups that may train for the KL term alone
        while len(self._kept) < self.cfg.groups_per_step:
            left_ms = 200 if deadline is None else min(200, int((deadline - time.monotonic()) * 1000))
            entries = self.stream.read(count=self.cfg.groups_per_step - len(self._kept),
                                       block_ms=left_ms if left_ms > 0 else None)  # None: no wait
            if not entries and deadline is not None and time.monotonic() >= deadline:
                self.stream.drop(anchors, "zero_variance")  # no step to join
                return None
            dropped: dict[str, list[Entry]] = {}
            for entry in entries:
                self.counters["groups_read"] += 1
                usable, scale, staleness, why = self._admit(entry.group)
                if usable:
                    self._kept.append((entry, scale, staleness))
                elif why == "zero_variance" and self._anchors_kl(entry.group):
                    anchors.append(entry)
                else:
                    dropped.setdefault(why, []).append(entry)
            # A dropped group changes no weights, and a resumed learner would drop it again, so it
            # is acknowledged at once: the backlog of unacknowledged entries stays bounded by the
            # groups trained since the last checkpoint (producers wait when the stream is full).
            for why, settled in dropped.items():
                self.stream.drop(settled, why)
            if len(anchors) > self.cfg.kl_anchor_groups:  # the newest are kept: the oldest go stale first
                self.stream.drop(anchors[: -self.cfg.kl_anchor_groups], "zero_variance")
                anchors = anchors[-self.cfg.kl_anchor_groups:]
        kept, self._kept = self._kept[: self.cfg.groups_per_step], self._kept[self.cfg.groups_per_step:]
        self.counters["kl_anchor_groups"] += len(anchors)
        # zero advantage (scale 0): the group trains its KL term alone
        return kept + [(entry, 0.0, self.version - max(entry.group.min_version, 0)) for entry in anchors]

    def _anchors_kl(self, group: TrajectoryGroup) -> bool:
        """Whether a zero-variance group may join a step for its KL term (`kl_anchor_groups`)."""
        return self.cfg.kl_anchor_groups > 0 and self.env_kl_coef.get(group.env_id, self.cfg.kl_coef) > 0

    def _groups(self, kept) -> list[tuple[list[Trajectory], list[float], str]]:
        """Each kept group's (samples, advantages, env id), advantages from the whole group. With the
        overlong filter a cut sample is left out: every term of the loss (policy, KL, MTP) and its
        normalisation count only policy tokens, so a row with none changes nothing but the
        learner's time (a fifth of the quick start's policy tokens were in such rows)."""
        groups = []
        for entry, scale, _ in kept:
            group = entry.group
            adv = task_and_shaping_advantages(*task_and_shaping(group), self.cfg.advantage)[0] * scale
            samples, advantages = [], []
            for sample, a in zip(group.samples, adv.tolist(), strict=True):
                if sample.finish_reason == "length" and self.env_overlong_filter.get(group.env_id, self.cfg.overlong_filter):
                    self.counters["overlong_masked"] += 1
                    if not self._anchors_kl(group):
                        continue
                    a = 0.0  # its KL term alone (`kl_anchor_groups`)
                samples.append(sample)
                advantages.append(a)
            if samples:
                groups.append((samples, advantages, group.env_id))
        return groups

    def _pack(self, groups: list[tuple[list[Trajectory], list[float], str]]) -> list[MicroBatch]:
        pad = self.policy.tokenizer.pad_token_id or 0
        # per-group KL coefficients only where an environment overrides `kl_coef`
        kl = [self.env_kl_coef.get(env, self.cfg.kl_coef) for *_, env in groups] if self.env_kl_coef else None
        # These read whole rows (replayed experts and balance statistics per row position), or
        # drop the cache a shared prompt hands to its rows (transformers' checkpointed layers).
        # Under ZeRO-3 every forward pass gathers parameters with the other ranks, so every rank
        # must make as many: a shared prompt makes two, a rank's plain or padding micro-batch one.
        zero3_group = self.trainer.world_size > 1 and self.cfg.backend == "deepspeed" and self.cfg.zero_stage == 3
        whole_rows = (self.cfg.routing_replay or self.cfg.load_balance_coef or self.cfg.activation_checkpointing
                      or zero3_group)
        if whole_rows or not self.cfg.share_prompt:
            samples = [s for group, _, _ in groups for s in group]
            advantages = [a for _, adv, _ in groups for a in adv]
            per_row = None if kl is None else [c for c, (group, _, _) in zip(kl, groups, strict=True) for _ in group]
            return pack(samples, advantages, self.cfg.micro_batch_tokens, pad, routing=self.cfg.routing_replay,
                        kl_coefs=per_row)
        return pack_groups([(s, a) for s, a, _ in groups], self.cfg.micro_batch_tokens, pad, kl_coefs=kl)

    def _reference_term(self, module, model, reference, device) -> tuple[torch.Tensor, dict[str, float]]:
        """The KL to the warm start on a few reference answers, each weighted by its environment's
        `reference_kl_coef` (`learner.reference_kl`)."""
        return self.reference_set.loss(module, model, reference, self.objective.temperature, device)

    def _over_ranks(self, stats: dict[str, float]) -> dict[str, float]:
        """One rank's step statistics merged with every other's: tokens summed, time the slowest
        rank's, per-token means weighted by each rank's tokens (grad_norm and lr are global)."""
        if self.trainer.world_size == 1:
            return stats
        everyone = gather_to_all(stats)
        tokens = [s.get("trained_tokens", 0.0) for s in everyone]
        merged = {k: sum(s.get(k, 0.0) * t for s, t in zip(everyone, tokens, strict=True)) / max(sum(tokens), 1.0)
                  for k in stats}
        merged.update(trained_tokens=sum(tokens), train_s=max(s["train_s"] for s in everyone))
        merged.update({k: stats[k] for k in ("grad_norm", "lr") if k in stats})
        return merged

    def _share(self, kept: list | None) -> list | None:
        """This rank's part of the step's groups: rank 0 splits what it read, balancing tokens;
        every rank gets None when rank 0 has not got `groups_per_step` groups yet."""
        if self.trainer.world_size == 1:
            return kept
        shares = None if kept is None else split_by_tokens(kept, self.trainer.world_size)
        return scatter_from_rank0(shares)

    def step(self, timeout_s: float | None = None, progress: float | None = None) -> StepReport | None:
        """One step (None: not enough groups in `timeout_s`). `progress`: how far RL is towards its
        end (0..1), for the learning rate's decay (`lr_decay_to`)."""
        if progress is not None:
            self.trainer.set_progress(progress)
        waiting = time.perf_counter()
        kept = self.collect(timeout_s) if self.stream is not None else None
        mine = self._share(kept)  # data-parallel ranks step together or not at all
        self._waited += time.perf_counter() - waiting
        if mine is None:
            return None
        kept = kept if kept is not None else mine  # rank 0 commits and reports the whole step
        start = time.perf_counter()
        batches = self._pack(self._groups(mine))
        extra = self._reference_term if self.reference_set is not None else None
        per_step = self.trainer.train(batches, self.objective, self.cfg.minibatches, self.cfg.epochs, extra)
        self.version = self.trainer.steps
        stats = {k: float(np.mean([s.get(k, 0.0) for s in per_step])) for k in per_step[-1]}
        stats["trained_tokens"] = float(sum(s.get("trained_tokens", 0) for s in per_step))
        stats["train_s"] = time.perf_counter() - start
        stats = self._over_ranks(stats)
        stats["tokens_per_s"] = stats["trained_tokens"] / max(stats["train_s"], 1e-9)
        stats["wait_s"], self._waited = self._waited, 0.0  # for groups, since the previous step
        if self.version % self.cfg.publish_every == 0:
            stats["publish_s"] = self.publish()
        if self.stream is not None:
            self._uncommitted += [entry for entry, _, _ in kept]
        every = self.cfg.checkpoint_every
        if every == 0:
            if self.stream is not None:
                self.stream.ack(self._uncommitted)
            self._uncommitted = []
        elif self.version // every > (self.version - len(per_step)) // every:
            writing = time.perf_counter()
            self.checkpoint()
            stats["checkpoint_s"] = time.perf_counter() - writing
        groups = [e.group for e, _, _ in kept]
        return StepReport(self.version, stats, groups, [s for _, _, s in kept], [g.group_id for g in groups])
