"""Turn-level scheduling: every episode moves at its own pace, every group leaves when it is done.

    scheduler = TurnScheduler(engine, tokenizer, group_size=8, params=params, pool=pool, max_len=1024)
    scheduler.run(prompts, on_group=publish)              # each group handed over as soon as it is done
    scheduler.run(prompts, on_group=publish, more=draw)   # and a new prompt takes each finished one's place

`rollout.episodes.run_groups` moves a batch in lockstep: one engine call per turn for every live
episode, then every environment judges, then the next turn, and nothing is returned before the
slowest episode ends. Here one thread drives the engine step by step (`SteppingEngine`: submit,
step, cancel) while the environments judge on `pool`: an episode's next turn joins the running
batch as soon as its environment answered, a group goes to `on_group` as soon as its G episodes
are done, and a slow or hung environment delays only its own episode. Its time-out still
applies (counted from when its step starts on a pool thread, as in `run_groups`) and fails only
that episode.

Continuations keep the engine's state: every sample is kept (`keep_state`) until its environment
has answered, and the next turn sends only the tokens after it (the environment's reply in the
chat template) with `Request.parent`, so the conversation is never prefilled again. Engines
without the step-wise API (vLLM here) run whatever is queued as one `generate` call per step and
get the whole conversation each turn. Token bookkeeping (masks, behaviour log-probs, versions,
routing, thinking budgets per prompt, verdicts) is `rollout.episodes`', shared with `run_groups`.

Timing-dependent by nature (which turn joins which batch depends on when environments answer),
so evaluation, which promises the same score for the same weights, stays on `run_groups`.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from environments.base import Generation
from rollout.episodes import (
    Episode,
    Prompt,
    add_sample,
    continuation_ids,
    extend,
    response_text,
    start_group,
    to_group,
    turn_params,
)
from rollout.types import FINISH_LENGTH, Request, Sample, SamplingParams
from streams.trajectory import PROMPT, TrajectoryGroup

_IDLE_WAIT_S = 0.05  # how long the loop sleeps on environments when the engine has nothing to do


@dataclass(eq=False)
class _Open:
    """A group in flight."""

    prompt: Prompt
    episodes: list[Episode]
    left: int
    started: float = field(default_factory=time.monotonic)
    engine_s: float = 0.0  # summed over its episodes
    env_s: float = 0.0


@dataclass(eq=False)
class _Judging:
    """One environment step in flight (identity matters: a late answer of a timed-out step is dropped)."""

    ep: Episode
    group: _Open
    queued: float
    started: float | None = None
    future: Future | None = None


def _may_continue(ep: Episode) -> bool:
    """Whether the turn about to be generated can have a next one. A kept sample holds its engine
    slot until its environment has answered: kept on a last turn (every turn of a single-turn
    environment), finished samples held half the slots of a code round and the decode batch fell
    from 21 to 12 (`TextEnv.max_turns`; an environment without one may always continue)."""
    max_turns = getattr(getattr(ep.env, "unwrapped", ep.env), "max_turns", None)
    return not isinstance(max_turns, int) or ep.turns + 1 < max_turns


class _WholeCalls:
    """The step-wise API over an engine that only has `generate`: one call per step for what is queued."""

    def __init__(self, engine) -> None:
        self.engine, self.queued = engine, []

    def submit(self, request: Request) -> None:
        self.queued.append(request)

    def has_work(self) -> bool:
        return bool(self.queued)

    def step(self) -> list[tuple[Request, list[Sample]]]:
        requests, self.queued = self.queued, []
        return list(zip(requests, self.engine.generate(requests), strict=True))

    def cancel(self, request_id: int) -> None:
        self.queued = [r for r in self.queued if r.request_id != request_id]

    def release(self, handle) -> None:
        self.engine.release(handle)


class TurnScheduler:
    def __init__(self, engine, tokenizer, group_size: int, params: SamplingParams, pool: ThreadPoolExecutor,
                 max_len: int, routing: bool = False) -> None:
        if params.thinking_budget is not None:
            raise ValueError("the scheduler takes thinking budgets per prompt (Prompt.thinking_budget), where the "
                             "policy can read them, not in the shared sampling params")
        self.continues = hasattr(engine, "submit")  # a stepping engine keeps state for continuations
        self.engine = engine if self.continues else _WholeCalls(engine)
        self.tokenizer, self.group_size, self.params = tokenizer, group_size, params
        self.pool, self.max_len, self.routing = pool, max_len, routing
        self._latest_start = time.monotonic()  # when a pool thread last started a step

    def run(self, prompts: list[Prompt], on_group: Callable[[TrajectoryGroup], bool | None],
            more: Callable[[], Prompt | None] | None = None) -> None:
        """Run `prompts` (and one from `more()` after each finished group, until it says None) until
        every group went to `on_group`; `on_group` returning False stops, dropping the rest."""
        self._requests: dict[int, tuple[_Open, list[Episode], float]] = {}
        self._judging: set[_Judging] = set()
        self._handles: dict[int, object] = {}  # id(episode) -> its kept engine state
        self._ready: list[TrajectoryGroup] = []
        self._results: queue.Queue = queue.Queue()  # a fresh one: late answers of a past run land elsewhere
        self._running = 0
        try:
            for p in prompts:
                self._start_group(p)
            while self._running or self._ready:
                if self._ready:
                    group, self._ready = self._ready[0], self._ready[1:]
                    if on_group(group) is False:
                        return
                    nxt = more() if more is not None else None
                    if nxt is not None:
                        self._start_group(nxt)
                    continue
                self._collect(block=not self.engine.has_work())
                self._expire()
                if self.engine.has_work():
                    for request, samples in self.engine.step():
                        self._generated(request, samples)
        finally:
            self._abandon()

    # -- engine side ----------------------------------------------------------------------------
    def _start_group(self, p: Prompt) -> None:
        eps = start_group(self.tokenizer, p, self.group_size, self.routing)
        group = _Open(p, eps, left=len(eps))
        self._running += 1
        # First turn: the prompt prefilled once for its G samples.
        self._submit(group, eps, Request(list(eps[0].tokens), self._turn_params(self.group_size, eps[0])))

    def _turn_params(self, n: int, ep: Episode) -> SamplingParams:
        params = turn_params(self.params, n, self.routing, ep, self.max_len)
        return dataclasses.replace(params, keep_state=self.continues and _may_continue(ep))

    def _submit(self, group: _Open, eps: list[Episode], request: Request) -> None:
        self._requests[request.request_id] = (group, eps, time.monotonic())
        self.engine.submit(request)

    def _generated(self, request: Request, samples: list[Sample]) -> None:
        """A turn's samples are in: record them and hand each episode's turn to its environment."""
        group, eps, submitted = self._requests.pop(request.request_id)
        now = time.monotonic()
        group.engine_s += (now - submitted) * len(eps)
        for ep, s in zip(eps, samples, strict=True):
            add_sample(ep, s)
            ep.turns += 1
            ep.finish = s.finish_reason
            if s.handle is not None:
                self._handles[id(ep)] = s.handle
            gen = Generation(response_text(self.tokenizer, s.token_ids), tokens=len(s.token_ids),
                             thinking_tokens=s.thinking_tokens, thinking_budget=s.thinking_budget or 0,
                             truncated=s.finish_reason == FINISH_LENGTH)
            job = _Judging(ep, group, queued=now)
            job.future = self.pool.submit(self._env_step, job, gen, self._results)
            self._judging.add(job)

    def _next_turn(self, ep: Episode, group: _Open) -> None:
        """The environment answered and the episode goes on: its reply and the next turn's opening."""
        ids = continuation_ids(self.tokenizer, ep, ep.finish != FINISH_LENGTH)
        if len(ep.tokens) + len(ids) + 1 >= self.max_len:
            ep.done, ep.finish = True, FINISH_LENGTH  # no room for another turn
            self._finish(ep, group)
            return
        extend(ep, ids, PROMPT)
        parent = self._handles.pop(id(ep), None)
        if parent is not None:  # only the new tokens; the kept state holds the rest (ownership moves with it)
            request = Request(ids, self._turn_params(1, ep), parent=parent)
        else:  # no kept state (or an environment went past its `max_turns`): the whole conversation
            request = Request(list(ep.tokens), self._turn_params(1, ep))
        self._submit(group, [ep], request)

    # -- environment side -----------------------------------------------------------------------
    def _env_step(self, job: _Judging, gen: Generation, results: queue.Queue) -> None:
        """On a pool thread: the environment's step, reported back to the loop whatever happens."""
        job.started = self._latest_start = time.monotonic()
        try:
            results.put((job, job.ep.env.step(gen), None))
        except Exception as e:  # noqa: BLE001 - an environment's bug ends its episode, not the worker
            results.put((job, None, e))

    def _collect(self, block: bool) -> None:
        """Take every environment answer that is in (waiting briefly for one when `block`)."""
        try:
            item = self._results.get(timeout=_IDLE_WAIT_S) if block else self._results.get_nowait()
            while True:
                self._judged(*item)
                item = self._results.get_nowait()
        except queue.Empty:
            return

    def _judged(self, job: _Judging, outcome, error: BaseException | None) -> None:
        if job not in self._judging:
            return  # answered after its time-out: the episode has already failed
        self._judging.discard(job)
        ep, group = job.ep, job.group
        group.env_s += time.monotonic() - (job.started or job.queued)
        if error is not None:
            self._fail(ep, group, f"{type(error).__name__}: {error}")
            return
        reply, reward, terminated, truncated, info = outcome
        ep.reply, ep.reward = reply, reward
        ep.done = bool(terminated or truncated)
        if not ep.done:
            self._next_turn(ep, group)
            return
        ep.parts = dict(info.get("reward_breakdown", {}))
        ep.verdict = str(info.get("verdict", ""))
        self._finish(ep, group)

    def _expire(self) -> None:
        """Fail the steps past their time-out. A step still queued for a pool thread times out only
        once no step has started for a whole time-out: every thread is held by a step past its own."""
        now = time.monotonic()
        for job in list(self._judging):
            timeout = job.group.prompt.timeout_s
            begun = job.started
            if begun is None and now < max(job.queued, self._latest_start) + timeout:
                continue
            if begun is not None and now < begun + timeout:
                continue
            # The thread cannot be killed; model code runs in the sandbox with its own limits, so
            # only a broken environment keeps it busy.
            job.future.cancel()
            self._judging.discard(job)
            self._fail(job.ep, job.group, "environment step timed out")

    # -- episodes and groups ---------------------------------------------------------------------
    def _fail(self, ep: Episode, group: _Open, reason: str) -> None:
        ep.failed, ep.done = reason, True
        self._finish(ep, group)

    def _finish(self, ep: Episode, group: _Open) -> None:
        handle = self._handles.pop(id(ep), None)
        if handle is not None:
            self.engine.release(handle)
        group.left -= 1
        if group.left == 0:
            self._running -= 1
            n = len(group.episodes)
            timings = {"generate_s": group.engine_s / n, "env_s": group.env_s / n,
                       "wall_s": time.monotonic() - group.started}
            self._ready.append(to_group(group.prompt, group.episodes, timings))

    def _abandon(self) -> None:
        """Stopped early (or failed): nothing of this run may keep engine slots or pool threads."""
        for request_id in self._requests:
            self.engine.cancel(request_id)
        for handle in self._handles.values():
            self.engine.release(handle)
        for job in self._judging:
            job.future.cancel()
        self._requests, self._handles, self._judging = {}, {}, set()
