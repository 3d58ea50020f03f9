"""The rollout worker as a plain class: environments + engine -> trajectory groups -> the stream.

    worker = RolloutWorker(cfg.rollout, cfg.environments, engine, tokenizer, stream, sync, seed=0)
    groups = worker.round()     # one round: pull weights, generate, judge, publish
    worker.run()                # streams until worker.stop() (a Ray actor runs this on a thread)

Prompts are shared across the environments by their configured weights (`rollout.mix`: by
default each weight is a share of the groups with differing rewards; each environment's
`concurrency` caps its live episodes), each with a thinking budget from `rollout.budget` (seeded,
shared by the prompt's G samples, stated in its system message). Episodes run turn by turn at
their own pace (`rollout.scheduler.TurnScheduler`) and a group is published the moment its G
episodes are done, never after the round's slowest. `round()` runs one batch of prompts after
pulling the newest weights (never waiting for them); `run()` streams: each finished group's
place goes to a new prompt, and new weights are pulled between groups. A group's failed
episodes are dropped from it and counted in its metadata; a group with fewer than two samples
left is not published (no advantage to learn).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from configs.schema import BudgetConfig, EnvironmentConfig, RolloutConfig
from environments import HACK_VERDICTS, env_factory
from rollout.budget import draw_budget
from rollout.episodes import Prompt
from rollout.scheduler import TurnScheduler
from rollout.types import SamplingParams
from streams.trajectory import TrajectoryGroup


def sampling_params(cfg: RolloutConfig) -> SamplingParams:
    """The settings every request shares; thinking budgets are per prompt (`budget_range`)."""
    s = cfg.sampling
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens,
                          grace_tokens=cfg.budget.grace_tokens)


def budget_range(cfg: BudgetConfig) -> tuple[int, int] | None:
    """The inclusive range a prompt's thinking budget is drawn from (None: no budget)."""
    return (cfg.min_tokens, cfg.max_tokens) if cfg.max_tokens else None


class RolloutWorker:
    def __init__(self, cfg: RolloutConfig, envs: dict[str, EnvironmentConfig], engine, tokenizer, stream,
                 sync=None, seed: int = 0, routing: bool = False, seed_limit: int = 1_000_000) -> None:
        if not envs:
            raise ValueError("no environments configured: add at least one under `environments:`")
        self.cfg, self.envs, self.engine, self.tokenizer = cfg, envs, engine, tokenizer
        self.stream, self.sync, self.routing = stream, sync, routing
        self.factories = {name: env_factory(env) for name, env in envs.items()}
        self.params = sampling_params(cfg)
        self.budgets = budget_range(cfg.budget)
        self.rng = random.Random(seed)
        self.seed_limit = seed_limit  # training seeds stay below the held-out evaluation seeds
        workers = sum(e.concurrency for e in envs.values())
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="env")
        self.scheduler = TurnScheduler(engine, tokenizer, cfg.group_size, self.params, self.pool, cfg.max_len, routing)
        self.counters: Counter[str] = Counter()
        self.stop_event = threading.Event()

    def pull_weights(self) -> bool:
        """Take the newest published version if there is one; returns whether the weights changed."""
        if self.sync is None:
            return False
        update = self.sync.pull(newer_than=self.engine.version)
        if update is None:
            return False
        self.engine.update_weights(update.weights, update.version)
        self.counters["weight_updates"] += 1
        return True

    def prompts(self) -> list[Prompt]:
        """A round's prompts: environments drawn by weight, each within its concurrency."""
        live: Counter[str] = Counter()
        chosen: list[Prompt] = []
        for _ in range(max(1, self.cfg.max_concurrent_episodes // self.cfg.group_size)):
            p = self._draw(live)
            if p is None:
                break
            live[p.name] += 1
            chosen.append(p)
        return chosen

    def _draw(self, live: Counter[str]) -> Prompt | None:
        """One prompt from an environment drawn by weight among those with room for another group
        (`live`: groups running per environment); None when all are full."""
        g = self.cfg.group_size
        open_names = [n for n, env in self.envs.items()
                      if env.weight > 0 and max(1, env.concurrency // g) > live[n]]
        if not open_names:
            return None
        if self.cfg.mix == "informative":
            # Drawn by weight alone, the environment whose episodes end soonest (single-turn math)
            # filled most of every step, and mostly with groups the learner drops for equal rewards.
            # An environment counts as served by at least a quarter of its finished groups: one
            # that never yields differing rewards (a policy that always fails it) must not take
            # every slot from those that do, or the learner waits for groups nobody makes.
            served = {n: max(self.counters[f"{n}/informative_groups"], self.counters[f"{n}/groups_done"] / 4)
                      / self.envs[n].weight for n in open_names}
            open_names = [n for n in open_names if served[n] == min(served.values())]
        name = self.rng.choices(open_names, weights=[self.envs[n].weight for n in open_names])[0]
        env = self.envs[name]
        seed = self.rng.randrange(self.seed_limit)
        return Prompt(name, env.id, self.factories[name], seed, env.timeout_s,
                      thinking_budget=draw_budget(self.budgets, self.rng, self.cfg.budget.unbudgeted_fraction))

    def round(self) -> list[TrajectoryGroup]:
        self.pull_weights()
        published: list[TrajectoryGroup] = []
        self.scheduler.run(self.prompts(), on_group=lambda group: self._take(group, published))
        return published

    def _take(self, group: TrajectoryGroup, published: list[TrajectoryGroup]) -> bool:
        """Count a finished group and publish it; False once stopped while the stream is full."""
        failed = group.metadata["failed"]
        self.counters["episodes_failed"] += len(failed)
        self.counters["episodes"] += len(failed) + len(group.samples)
        self.counters["policy_tokens"] += sum(s.policy_tokens for s in group.samples)
        # Every generated sample, before the learner's filters (dynamic sampling keeps only
        # mixed groups, so the trained groups' mean says little about the policy itself).
        name = group.metadata.get("env", group.env_id)
        rewards = [s.reward for s in group.samples]
        self.counters[f"{name}/reward_sum"] += sum(rewards)
        self.counters[f"{name}/samples"] += len(rewards)
        self.counters[f"{name}/groups_done"] += 1
        self.counters[f"{name}/informative_groups"] += len(rewards) > 1 and max(rewards) - min(rewards) > 1e-9
        # Each verdict's count, and the hack-like ones together (logged as rollout/<env>/...).
        for verdict in group.metadata.get("verdicts", []):
            self.counters[f"{name}/verdict/{verdict or 'none'}"] += 1
            self.counters[f"{name}/verdict_hack_like"] += verdict in HACK_VERDICTS
        if len(group.samples) < 2:
            self.counters["groups_unpublished"] += 1
            return True
        group.metadata["published_at"] = time.time()
        if not self._publish(group):
            return False  # stopping while the stream is full: the rest is dropped
        published.append(group)
        self.counters["groups"] += 1
        return True

    def _publish(self, group: TrajectoryGroup) -> bool:
        """Publish, waiting while the stream is full, but giving up once the worker is stopped."""
        while True:
            try:
                self.stream.publish(group, timeout_s=2.0)
                return True
            except TimeoutError:
                if self.stop_event.is_set():
                    return False

    def run(self, max_rounds: int | None = None) -> dict[str, int]:
        """Stream groups until `stop()` (or `max_rounds` rounds' worth of prompts); returns the counters.

        A finished group is published and a new prompt takes its place at once, so the engine
        never idles on a round's slowest episode; weights are pulled after every group."""
        self.pull_weights()
        first = self.prompts()
        limit = None if max_rounds is None else max_rounds * len(first)
        live = Counter(p.name for p in first)
        started = [len(first)]

        def on_group(group: TrajectoryGroup) -> bool:
            live[group.metadata["env"]] -= 1
            ok = self._take(group, [])
            self.pull_weights()
            return ok

        def more() -> Prompt | None:
            if self.stop_event.is_set() or (limit is not None and started[0] >= limit):
                return None
            p = self._draw(live)
            if p is not None:
                live[p.name] += 1
                started[0] += 1
            return p

        if limit != 0 and not self.stop_event.is_set():
            self.scheduler.run(first, on_group, more)
        return dict(self.counters)

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
