"""The engine protocol: what a rollout engine takes (requests) and gives back (samples).

Every engine (torch, vLLM) returns, per generated token, the behaviour log-probability under the
distribution it was actually drawn from (after temperature, top-k, top-p), whether budget
control forced it, and the policy version that produced it, so the learner can correct for
everything off-policy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Protocol

FINISH_STOP = "stop"  # a stop token (EOS) or stop string
FINISH_LENGTH = "length"  # max_new_tokens reached

_ids = itertools.count()


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop tokens; the tokenizer's EOS always stops."""
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks: fixed-length outputs)."""
    thinking_budget: int | None = None
    """Thinking tokens allowed inside <think> for every sample of the request (None: no limit).
    Draw a budget per prompt (`rollout.budget.draw_budget`) and state it in the prompt
    (`rollout.budget.with_budget`): the engine never draws one the policy cannot see."""
    grace_tokens: int = 8
    """Tokens past the budget to wait for a newline before forcing </think>."""
    return_routing: bool = False
    """MoE policies: return the experts each token was routed to."""
    seed: int | None = None
    keep_state: bool = False
    """Keep the sample's state in the engine so `Request.parent` can continue it."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (behaviour log-probs need a distribution)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError("n and max_new_tokens must be >= 1")
        if self.thinking_budget is not None and not isinstance(self.thinking_budget, int):
            raise ValueError(f"thinking_budget={self.thinking_budget!r} must be a number of tokens or None; "
                             "draw a range once per prompt with rollout.budget.draw_budget and state it "
                             "in the prompt with rollout.budget.with_budget")


@dataclass
class Request:
    prompt_ids: list[int]
    """Prompt token ids (or, with `parent`, only the tokens appended after the parent sample)."""
    params: SamplingParams = field(default_factory=SamplingParams)
    parent: Any = None
    """A kept `Sample.handle` to continue from without recomputing its prefix (multi-turn)."""
    request_id: int = field(default_factory=lambda: next(_ids))


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]
    """Behaviour log-prob of each token under the distribution it was drawn from (0.0 if forced)."""
    forced: list[bool]
    """True where budget control forced the token (not the policy's own sample)."""
    versions: list[int]
    """Policy version that produced each token."""
    finish_reason: str
    thinking_tokens: int = 0
    thinking_budget: int | None = None
    routed_experts: list[list[list[int]]] | None = None
    """Per token, per MoE layer, the expert ids (when requested)."""
    handle: Any = None
    """Engine state kept for continuation (`SamplingParams.keep_state`)."""


class Engine(Protocol):
    """A generation engine: `torch` (rollout.torch_engine) or `vllm` (rollout.vllm_engine)."""

    version: int

    def generate(self, requests: list[Request]) -> list[list[Sample]]:
        """Generate `params.n` samples for each request; blocks until all are done."""

    def update_weights(self, weights: dict[str, Any], version: int) -> None:
        """Swap in new weights (name -> tensor) while serving; later tokens carry `version`."""

    def release(self, handle: Any) -> None:
        """Drop the state kept for a sample."""

    def shutdown(self) -> None:
        """Free the engine's resources."""


class SteppingEngine(Engine, Protocol):
    """An engine that takes requests while it decodes others (torch): `rollout.scheduler` drives it
    from one thread so that an episode's next turn starts as soon as its environment answered, and
    continues kept samples (`Request.parent`) instead of re-sending the conversation."""

    def submit(self, request: Request) -> None:
        """Queue a request; it joins the running batch as soon as its slots are free."""

    def step(self) -> list[tuple[Request, list[Sample]]]:
        """One decoding step; the requests whose samples all finished, with those samples."""

    def has_work(self) -> bool:
        """Whether any submitted request is still queued or decoding."""

    def cancel(self, request_id: int) -> None:
        """Drop a request and free every slot it holds."""
