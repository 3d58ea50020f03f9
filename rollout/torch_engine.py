"""Estuary's torch engine: continuous batching over slot-based incremental decoders.

    engine = TorchEngine(policy, max_batch=64, max_len=2048)
    [samples] = engine.generate([Request(prompt_ids, SamplingParams(n=8, thinking_budget=32))])

Each request is prefilled once and forked into its `n` slots; every step samples one token for
every active sequence (any lengths, any mix of sampling settings), finished sequences leave and
waiting ones join. Weights can be swapped from another thread while it serves (`update_weights`):
the swap happens between steps and every token records the version that produced it.

`generate` blocks until its requests are done. A scheduler that feeds requests as they come
(`rollout.scheduler`: the next turn of an episode as soon as its environment answered) drives
the same loop step by step from one thread: `submit(request)`, then `step()` returns the
requests whose samples all finished; `cancel(request_id)` drops one. A kept sample
(`keep_state`) holds its slot until it is continued (`Request.parent`) or released.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from models.fast_llama import fast_decoder
from rollout.budget import BudgetControl, BudgetState
from rollout.draft_governor import DraftGovernor
from rollout.sampling import processed_for, sample
from rollout.types import FINISH_LENGTH, FINISH_STOP, Request, Sample


@dataclass
class _Seq:
    request: Request
    slot: int
    budget: BudgetState
    budget_limit: int | None
    logits: torch.Tensor | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    routing: list[list[list[int]]] | None = None
    finish: str | None = None
    pending: int | None = None  # speculative mode: emitted, not yet fed
    # final hidden state at the last fed position, as (a pass's hidden states, this sequence's row):
    # the row is taken only by a step that drafts from it (unbinding every plain step's rows cost
    # ~0.5% of a batch-32 step on the tiny policy, session 45)
    hidden: tuple[torch.Tensor, int] | None = None


class EngineError(ValueError):
    """A request the engine cannot serve; the message says what to change."""


class TorchEngine:
    """Generation with exact behaviour log-probs, budget control and live weight swaps."""

    def __init__(self, policy, max_batch: int = 64, max_len: int = 4096, seed: int = 0,
                 mtp_steps: int = 0, draft_max_batch: int = -1, draft_dtype: str = "float32") -> None:
        self.model = policy.model
        self.tokenizer = policy.tokenizer
        self.decoder = fast_decoder(self.model)
        self.max_batch = max_batch
        self.state = self.decoder.new_state(max_batch, max_len)
        self.free = deque(range(max_batch))
        self._waiting: list[Request] = []  # submitted, not yet admitted (`step` admits what fits)
        self._active: list[_Seq] = []
        self._done: dict[int, list[_Seq]] = {}  # request id -> its finished samples so far
        self.version = 0
        self.eos = {self.tokenizer.eos_token_id}
        self.budget = _budget_control(self.tokenizer)
        self._pending: tuple[dict[str, torch.Tensor], int] | None = None
        self._lock = threading.Lock()
        self._gen = torch.Generator(device=self.state.device).manual_seed(seed)
        self.device = self.state.device
        self.moe = self.model.config.model_type == "nemotron_h" and "moe" in getattr(
            self.model.config, "layers_block_type", [])
        self.mtp_steps = mtp_steps
        if mtp_steps and (getattr(self.model, "mtp", None) is None or not hasattr(self.decoder, "verify")):
            raise EngineError("mtp_steps > 0 needs a NemotronH policy with MTP heads "
                              "(add them with models.mtp.add_mtp_heads / `estuary model train-mtp`)")
        if draft_dtype not in ("float32", "int8"):
            raise EngineError(f"draft_dtype={draft_dtype!r}: choose float32 or int8")
        # int8 copies of the MTP head for drafting (`models/draft_int8.py`); None: the fp32 head
        self.draft_head = None
        if mtp_steps and draft_dtype == "int8":
            from models.draft_int8 import Int8DraftHead

            self.draft_head = Int8DraftHead(self.model)
        self.stats = {"drafted": 0, "accepted": 0, "steps": 0}
        # how deep to draft (0: not at all) by the active batch (-1: the crossovers measured as it runs)
        self.governor = DraftGovernor(draft_max_batch, max_depth=mtp_steps)
        # What a step costs, for the governor: on a CPU the engine thread's own CPU time. Wall time
        # there counts the waits for the GIL while environment threads judge (and a learner's
        # process on the same cores): in a streaming code round it read plain steps 2-3x dearer
        # than their compute and drafted at batch 8-32, where drafts cost CPU (0.18 -> 0.25 CPU s
        # per 1k tokens). With more than one intra-op thread it counts the engine thread's share, alike
        # for both modes (a rollout worker runs one: `rollout.cpus_per_worker`). On a GPU wall time is the cost.
        self._clock = time.thread_time if self.device.type == "cpu" else time.perf_counter
        self._drafted_last: bool | None = None  # the previous step's mode
        self._emitted = 0  # tokens emitted so far
        self._passes = 0  # forward passes (decode or verification) so far

    # -- weights ------------------------------------------------------------------------------
    def update_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Queue new weights; they are applied between two decoding steps."""
        params = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        unknown = [name for name in weights if name not in params]
        if unknown:
            raise EngineError(f"update_weights: {len(unknown)} names the policy lacks, e.g. {unknown[:3]}")
        with self._lock:
            self._pending = (weights, version)

    def _apply_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        weights, version = pending
        params = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor, non_blocking=True)
        if self.draft_head is not None:  # its int8 copies are of the old weights
            self.draft_head.invalidate()
        self.version = version

    # -- serving ------------------------------------------------------------------------------
    def generate(self, requests: list[Request]) -> list[list[Sample]]:
        """Blocking: every request's samples, in request order (the step-wise loop, driven to the end)."""
        for request in requests:
            self.submit(request)
        done: dict[int, list[Sample]] = {}
        try:
            while len(done) < len(requests):
                finished = self.step()
                if not finished and not self._active:
                    raise EngineError(f"a request needs {self._waiting[0].params.n} slots; {len(self.free)} of "
                                      f"max_batch={self.max_batch} are free (release kept samples)")
                done.update((request.request_id, samples) for request, samples in finished)
        except BaseException:
            for request in requests:  # leave no half-served request behind in the queue
                self.cancel(request.request_id)
            raise
        return [done[r.request_id] for r in requests]

    # -- step-wise serving: one thread adds requests while others decode ----------------------
    def submit(self, request: Request) -> None:
        """Queue a request; `step` admits it as soon as its slots are free (a continuation of a
        kept sample with n=1 needs none, so it never waits behind a new prompt)."""
        if request.params.n > self.max_batch:
            raise EngineError(f"a request needs {request.params.n} slots; max_batch is {self.max_batch}")
        if not request.prompt_ids:
            raise EngineError("a request needs at least one prompt token")
        self._waiting.append(request)
        self._done[request.request_id] = []

    def has_work(self) -> bool:
        return bool(self._waiting or self._active)

    def step(self) -> list[tuple[Request, list[Sample]]]:
        """Admit what fits, then one decoding step for every active sequence; returns the requests
        whose `n` samples have all finished, with their samples (in slot order)."""
        self._apply_pending()
        for request in list(self._waiting):
            if self._admit(request, self._active):
                self._waiting.remove(request)
        if not self._active:
            return []
        out = []
        for seq in self._step(self._active):
            self._active.remove(seq)
            rid = seq.request.request_id
            self._done[rid].append(seq)
            if len(self._done[rid]) == seq.request.params.n:
                seqs = sorted(self._done.pop(rid), key=lambda s: s.slot)
                out.append((seq.request, [self._to_sample(s) for s in seqs]))
        return out

    def cancel(self, request_id: int) -> None:
        """Drop a request, queued or running, and free every slot it holds (its parent's included)."""
        for request in [r for r in self._waiting if r.request_id == request_id]:
            self._waiting.remove(request)
            self.release(request.parent)
        for seq in [s for s in self._active if s.request.request_id == request_id]:
            self._active.remove(seq)
            self.release(seq.slot)
        for seq in self._done.pop(request_id, []):  # finished: only kept samples still hold a slot
            if seq.request.params.keep_state:
                self.release(seq.slot)

    def _admit(self, request: Request, active: list[_Seq]) -> bool:
        p = request.params
        parent = request.parent
        need = p.n - (1 if parent is not None else 0)
        if need > len(self.free):
            return False
        if parent is not None:
            first = int(parent)
        else:
            first = self.free.popleft()
            need -= 1
            self.state.reset(first)
        prompt = torch.tensor(request.prompt_ids, dtype=torch.long, device=self.device)
        routing: list | None = [] if (p.return_routing and self.moe) else None
        hidden = None
        if self.mtp_steps:
            logits, hidden = self.decoder.extend(self.state, first, prompt, routing, return_hidden=True, last=True)
            logits, hidden = logits[-1], (hidden, len(request.prompt_ids) - 1)
        else:
            logits = self.decoder.extend(self.state, first, prompt, routing, last=True)[-1]
        slots = [first] + [self.free.popleft() for _ in range(need)]
        self.state.copy(first, slots[1:])
        for slot in slots:  # the request's samples share its budget (stated in its prompt)
            seq = _Seq(request, slot, self.budget.start(p.thinking_budget, p.grace_tokens, request.prompt_ids),
                       p.thinking_budget, logits=logits, routing=[] if routing is not None else None,
                       hidden=hidden)
            active.append(seq)
        return True

    def _emit(self, seq: _Seq, token: int, logprob: float, forced: bool) -> None:
        self._emitted += 1  # for the governor: tokens per step without summing every sequence's
        seq.tokens.append(token)
        seq.logprobs.append(logprob)
        seq.forced.append(forced)
        seq.versions.append(self.version)
        self.budget.observe(seq.budget, token)
        seq.finish = self._finish_reason(seq, token)

    def _step(self, active: list[_Seq]) -> list[_Seq]:
        depth = self.governor.depth(len(active)) if self.mtp_steps else 0
        draft = depth > 0
        # A step that switches modes costs what neither mode does (a switch off feeds the tokens
        # left for a speculative step; a switch on emits tokens without a forward pass): only
        # steps in the same mode as the one before are measured. So is a step that ran no
        # forward pass (its sequences' first or last tokens, sampled from logits at hand): one
        # per request at batch 1, it made whichever depth it fell on look cheap.
        steady, self._drafted_last = draft == self._drafted_last, draft
        start, before, passes = (self._clock(), self._emitted, self._passes) if self.mtp_steps else (0.0, 0, 0)
        if self.mtp_steps and not draft:  # plain steps: feed the tokens left for a speculative step
            waiting = [s for s in active if s.pending is not None]
            for seq in waiting:
                seq.pending = None
            if waiting:
                self._decode(waiting)
        drafting = [s for s in active if s.pending is not None]
        fresh = [s for s in active if s.pending is None]
        finished = self._sample_step(fresh, draft) if fresh else []
        if drafting:
            from rollout.torch_spec import spec_step

            done = spec_step(self, drafting, depth)
            self._passes += 1
            kept = [s for s in done if s.request.params.keep_state]
            if kept:
                self._decode(kept)  # absorb the last emitted token for a continuation
            finished += done
        for seq in finished:
            if not seq.request.params.keep_state:
                self.free.append(seq.slot)
        if self.mtp_steps and steady and self._passes > passes:
            self.governor.record(len(active), depth, self._clock() - start, self._emitted - before)
        return finished

    def _sample_step(self, active: list[_Seq], draft: bool = False) -> list[_Seq]:
        """One token per sequence from its current logits (then fed, unless drafting takes over)."""
        lp = processed_for(torch.stack([s.logits for s in active]), [s.request.params for s in active])
        sampled, sampled_lp = sample(lp, self._gen)
        tokens, token_lp = sampled.tolist(), sampled_lp.tolist()  # one transfer, not B indexings
        feed: list[_Seq] = []
        for i, seq in enumerate(active):
            forced = self.budget.forced_token(seq.budget)
            token = forced if forced is not None else tokens[i]
            self._emit(seq, token, 0.0 if forced is not None else token_lp[i], forced is not None)
            if draft and seq.finish is None:
                seq.pending = token  # fed by the next speculative step, with its drafts
            elif seq.finish is None or seq.request.params.keep_state:
                feed.append(seq)  # kept samples absorb their last token for continuation
        if feed:
            self._decode(feed)
        return [s for s in active if s.finish is not None]

    def _decode(self, feed: list[_Seq]) -> None:
        slots = torch.tensor([s.slot for s in feed], device=self.device)
        last = torch.tensor([s.tokens[-1] for s in feed], device=self.device)
        routing: list | None = [] if any(s.routing is not None for s in feed) else None
        self._passes += 1
        if self.mtp_steps:  # the hidden state too: the next step may draft from it
            out, hidden = self.decoder.decode(self.state, slots, last, routing, return_hidden=True)
            for i, seq in enumerate(feed):
                seq.hidden = (hidden, i)
        else:
            out = self.decoder.decode(self.state, slots, last, routing)
        # logits rows by one `unbind`: 13.5 us for 32 rows here, indexing them one by one 18 us
        for i, (seq, row) in enumerate(zip(feed, out.unbind(0), strict=True)):
            seq.logits = row
            if routing is not None and seq.routing is not None:
                seq.routing.append([layer[i].tolist() for layer in routing])

    def _finish_reason(self, seq: _Seq, token: int) -> str | None:
        p = seq.request.params
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids:
            return FINISH_STOP
        if p.stop_strings:
            tail = self.tokenizer.decode(seq.tokens[-16:])
            if any(s in tail for s in p.stop_strings):
                return FINISH_STOP
        if len(seq.tokens) >= p.max_new_tokens:
            return FINISH_LENGTH
        return None

    def _to_sample(self, seq: _Seq) -> Sample:
        return Sample(
            token_ids=seq.tokens, logprobs=seq.logprobs, forced=seq.forced, versions=seq.versions,
            finish_reason=seq.finish or FINISH_LENGTH, thinking_tokens=seq.budget.used,
            thinking_budget=seq.budget_limit, routed_experts=seq.routing,
            handle=seq.slot if seq.request.params.keep_state else None,
        )

    def release(self, handle) -> None:
        """Give a kept sample's slot back."""
        if handle is not None and int(handle) not in self.free:
            self.free.append(int(handle))

    def shutdown(self) -> None:
        self.state.tensors.clear()


def _budget_control(tokenizer) -> BudgetControl:
    vocab = tokenizer.get_vocab()
    newline_ids = {i for tok, i in vocab.items() if "\n" in tokenizer.decode([i])} if vocab else set()
    return BudgetControl(vocab.get("<think>", -1), vocab.get("</think>", -1), newline_ids)
