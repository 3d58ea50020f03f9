"""Episodes: run groups of G samples per prompt through an engine and their environments.

    groups = run_groups(engine, tokenizer, [Prompt("math", "estuary/math", make_env, seed=7)],
                        group_size=8, params=SamplingParams(max_new_tokens=64), pool=pool)

Every episode has its own environment instance (reset with the prompt's seed, so the G samples
of a group answer the same task). A prompt's thinking budget (`Prompt.thinking_budget`, drawn
once per group by whoever picks the prompts) is stated in its system message and enforced on
every turn of its G episodes: the budget the rewards see is the one the policy read. In
`run_groups` turns run in lockstep for all live episodes: one engine call per turn (the first
turn prefills each prompt once for its G samples, later turns re-send the whole conversation),
then each environment judges its turn on a thread of `pool`, bounded by the environment's
`timeout_s` (counted from when its step starts). An environment that raises or runs past its
time-out ends that episode as failed, with the reason; the group keeps its other samples. Token
bookkeeping: policy tokens (mask POLICY, or FORCED where budget control wrote them) carry the
engine's log-probs and versions; the chat-template tokens around environment replies are PROMPT
tokens.

Lockstep is reproducible (the same weights and engine seed give the same groups), which is what
evaluation needs; rollout workers use `rollout.scheduler.TurnScheduler` instead, which shares
this bookkeeping but lets every episode and group move at its own pace.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from environments.base import Generation
from rollout.budget import with_budget
from rollout.types import FINISH_LENGTH, Request, Sample, SamplingParams
from streams.trajectory import FORCED, POLICY, PROMPT, Trajectory, TrajectoryGroup


@dataclass
class Prompt:
    name: str  # the environment's name in the config (its metrics key)
    env_id: str
    make_env: Callable[[], Any]
    seed: int
    timeout_s: float = 30.0
    thinking_budget: int | None = None  # the group's budget, stated in its prompt (None: no limit)


@dataclass
class Episode:
    env: Any
    tokens: list[int]
    mask: list[int]
    logprobs: list[float]
    versions: list[int]
    budget: int | None = None
    routing: list | None = None
    reward: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    finish: str = ""
    failed: str = ""
    verdict: str = ""  # the environment's verdict on the finished episode
    done: bool = False
    reply: list = field(default_factory=list)
    turns: int = 0
    thinking_tokens: int = 0


def extend(ep: Episode, ids: list[int], mask: int) -> None:
    ep.tokens += ids
    ep.mask += [mask] * len(ids)
    ep.logprobs += [0.0] * len(ids)
    ep.versions += [-1] * len(ids)


def add_sample(ep: Episode, s: Sample) -> None:
    start = len(ep.tokens)
    ep.tokens += s.token_ids
    ep.mask += [FORCED if f else POLICY for f in s.forced]
    ep.logprobs += [lp if not f else 0.0 for lp, f in zip(s.logprobs, s.forced, strict=True)]
    ep.versions += s.versions
    ep.thinking_tokens += s.thinking_tokens
    if ep.routing is not None and s.routed_experts:
        # The engine records a token's experts when that token is fed back in, so the routing
        # of generated token i (i < n-1) is the i-th record; other positions stay unknown (-1).
        for i, experts in enumerate(s.routed_experts[: len(s.token_ids) - 1]):
            ep.routing.append((start + i, experts))


def response_text(tokenizer, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    for end in (tokenizer.eos_token, tokenizer.pad_token):
        if end:
            text = text.replace(end, "")
    return text.strip()


def _judge(pool: ThreadPoolExecutor, jobs: list[tuple[Episode, Generation, float]]) -> None:
    """Step every episode's environment concurrently; failures end just that episode.

    A step's time-out counts from when a pool thread starts it, not from when it was queued: a
    batch larger than the pool (an evaluation's n samples of every instance) waits its turn.
    """
    started: dict[int, float] = {}
    latest = [time.monotonic()]  # when a step last started: the pool is making progress

    def step(ep: Episode, gen: Generation):
        started[id(ep)] = latest[0] = time.monotonic()
        return ep.env.step(gen)

    futures = [(ep, pool.submit(step, ep, gen), timeout) for ep, gen, timeout in jobs]
    for ep, future, timeout in futures:
        try:
            reply, reward, terminated, truncated, info = _result(future, started, id(ep), timeout, latest)
        except FutureTimeout:
            # The thread cannot be killed; model code runs in the sandbox with its own limits, so
            # only a broken environment keeps it busy.
            ep.failed, ep.done = "environment step timed out", True
            continue
        except Exception as e:  # noqa: BLE001 - an environment's bug ends its episode, not the worker
            ep.failed, ep.done = f"{type(e).__name__}: {e}", True
            continue
        ep.reply, ep.reward = reply, reward
        ep.done = bool(terminated or truncated)
        if ep.done:
            ep.parts = dict(info.get("reward_breakdown", {}))
            ep.verdict = str(info.get("verdict", ""))


def _result(future, started: dict[int, float], key: int, timeout: float, latest: list[float]):
    """The step's result, waited for until `timeout` after a pool thread started it. A step still
    queued waits while other steps keep starting; once none has for a whole `timeout`, every
    thread is held by a step past its time-out, and this one is cancelled as timed out too."""
    while True:
        begun, now = started.get(key), time.monotonic()
        end = begun + timeout if begun is not None else latest[0] + timeout
        try:
            return future.result(timeout=max(0.0, end - now))
        except FutureTimeout:
            if begun is None and (key in started or time.monotonic() < latest[0] + timeout):
                continue  # it has started since, or others have: wait on
            future.cancel()
            raise


def continuation_ids(tokenizer, ep: Episode, ended_by_eos: bool) -> list[int]:
    """Template tokens that close the policy's turn and open its next one after the env's reply."""
    close = "" if ended_by_eos else tokenizer.eos_token
    rendered = tokenizer.apply_chat_template(ep.reply, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(close + "\n" + rendered, add_special_tokens=False)


def start_group(tokenizer, p: Prompt, group_size: int, routing: bool) -> list[Episode]:
    eps = []
    for _ in range(group_size):
        env = p.make_env()
        messages, _ = env.reset(seed=p.seed)
        ids = list(tokenizer.apply_chat_template(with_budget(messages, p.thinking_budget),
                                                 add_generation_prompt=True, return_dict=False))
        eps.append(Episode(env, ids, [PROMPT] * len(ids), [0.0] * len(ids), [-1] * len(ids),
                           budget=p.thinking_budget, routing=[] if routing else None))
    return eps


def _turn_jobs(tokenizer, targets: list[Episode], samples: list[Sample], timeout_of: dict[int, float]):
    jobs = []
    for ep, s in zip(targets, samples, strict=True):
        add_sample(ep, s)
        ep.turns += 1
        ep.finish = s.finish_reason
        gen = Generation(response_text(tokenizer, s.token_ids), tokens=len(s.token_ids),
                         thinking_tokens=s.thinking_tokens, thinking_budget=s.thinking_budget or 0,
                         truncated=s.finish_reason == FINISH_LENGTH)
        jobs.append((ep, gen, timeout_of[id(ep)]))
    return jobs


def _next_turn(tokenizer, episodes: list[Episode], max_len: int) -> list[Episode]:
    """Append each live episode's environment reply and the next turn's opening; returns them."""
    live = []
    for ep in episodes:
        if ep.done:
            continue
        ids = continuation_ids(tokenizer, ep, ep.finish != FINISH_LENGTH)
        if len(ep.tokens) + len(ids) + 1 >= max_len:
            ep.done, ep.finish = True, FINISH_LENGTH  # no room for another turn
            continue
        extend(ep, ids, PROMPT)
        live.append(ep)
    return live


def run_groups(engine, tokenizer, prompts: list[Prompt], group_size: int, params: SamplingParams,
               pool: ThreadPoolExecutor, max_len: int, routing: bool = False) -> list[TrajectoryGroup]:
    """Generate and judge `group_size` episodes per prompt; one TrajectoryGroup per prompt."""
    if params.thinking_budget is not None:
        raise ValueError("run_groups takes thinking budgets per prompt (Prompt.thinking_budget), where the "
                         "policy can read them, not in the shared sampling params")
    episodes = [start_group(tokenizer, p, group_size, routing) for p in prompts]
    timeout_of = {id(ep): p.timeout_s for eps, p in zip(episodes, prompts, strict=True) for ep in eps}
    timings = {"generate_s": 0.0, "env_s": 0.0}
    # First turn: each prompt prefilled once for its G samples.
    requests = [Request(list(eps[0].tokens), turn_params(params, group_size, routing, eps[0], max_len))
                for eps in episodes]
    targets = [ep for eps in episodes for ep in eps]
    while targets:
        t0 = time.perf_counter()
        samples = [s for group in engine.generate(requests) for s in group]
        t1 = time.perf_counter()
        jobs = _turn_jobs(tokenizer, targets, samples, timeout_of)
        _judge(pool, jobs)
        timings["generate_s"] += t1 - t0
        timings["env_s"] += time.perf_counter() - t1
        targets = _next_turn(tokenizer, [ep for ep, _, _ in jobs], max_len)
        requests = [Request(list(ep.tokens), turn_params(params, 1, routing, ep, max_len)) for ep in targets]
    return [to_group(p, eps, timings) for p, eps in zip(prompts, episodes, strict=True)]


def turn_params(base: SamplingParams, n: int, routing: bool, ep: Episode, max_len: int) -> SamplingParams:
    room = max(1, min(base.max_new_tokens, max_len - len(ep.tokens) - 1))
    return SamplingParams(temperature=base.temperature, top_p=base.top_p, top_k=base.top_k, max_new_tokens=room,
                          n=n, stop_token_ids=base.stop_token_ids, stop_strings=base.stop_strings,
                          thinking_budget=ep.budget, grace_tokens=base.grace_tokens,
                          return_routing=routing, seed=None)


def _trajectory(ep: Episode) -> Trajectory:
    routed = None
    if ep.routing:
        layers, k = len(ep.routing[0][1]), len(ep.routing[0][1][0])
        routed = np.full((len(ep.tokens), layers, k), -1, dtype=np.int16)
        for pos, experts in ep.routing:
            routed[pos] = experts
    return Trajectory(np.array(ep.tokens), np.array(ep.mask, np.uint8), np.array(ep.logprobs, np.float32),
                      np.array(ep.versions), reward=ep.reward, reward_parts=ep.parts, finish_reason=ep.finish,
                      routed_experts=routed)


def to_group(p: Prompt, eps: list[Episode], timings: dict[str, float]) -> TrajectoryGroup:
    kept = [ep for ep in eps if not ep.failed]
    failures = [ep.failed for ep in eps if ep.failed]
    return TrajectoryGroup(env_id=p.env_id, prompt_id=f"{p.name}:{p.seed}", samples=[_trajectory(ep) for ep in kept],
                           timings=dict(timings), metadata={
                               "env": p.name, "failed": failures, "turns": [ep.turns for ep in kept],
                               "verdicts": [ep.verdict for ep in kept],
                               "thinking_budget": p.thinking_budget,
                               "thinking_tokens": [ep.thinking_tokens for ep in kept]})
