"""`TextEnv`: the gymnasium environment for text, which every Estuary environment subclasses.

    env = environments.make("estuary/math", difficulty=1)
    messages, info = env.reset(seed=7)              # chat messages: [{"role": "user", ...}]
    messages, reward, terminated, truncated, info = env.step("<think>...</think> \\boxed{19}")
    info["verdict"], info["reward_breakdown"]       # ("correct", {"correct": 1.0, ...})

A subclass provides a `Task` from a seed (`generate`) or from a JSONL row (`from_row`), scores a
turn (`score_turn`) and says what a perfect response is (`reference_turn`). The base class
handles datasets, seeding, turn counting, `max_turns`, shaping rewards and the info dict. An
environment holds only its own episode's state: run many at once, one instance per episode.
"""

from __future__ import annotations

import abc
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
from gymnasium import spaces

from rewards import RewardContext, combine

Message = dict[str, str]

MAX_TEXT = 1 << 24  # characters: 1M-token long-context prompts fit

# Verdicts that mean the answer went for the grader rather than the task (each scores 0, with no
# shaping bonus: below an honest wrong answer). Rollout
# workers count them per environment, so a policy drifting toward the grader's edges shows.
HACK_VERDICTS = frozenset({
    "bad_result", "escaped_exception", "exited", "protocol_violation",  # code (isolated_tests)
    "hedged", "too_large", "unevaluated",                              # math answers
    "forged_tool_response",                                            # tool_use
    "too_many_values",                                                 # long_context
})


@dataclass
class Task:
    """One instance: the opening messages, the gold answer and whatever scoring needs."""

    prompt: str
    answer: Any
    data: dict[str, Any] = field(default_factory=dict)
    system: str | None = None


@dataclass
class TurnResult:
    """How the environment answers one policy turn."""

    done: bool
    correct: float = 0.0
    verdict: str = ""
    reply: list[Message] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    penalty: float = 0.0
    """Subtracted from the episode's reward (e.g. malformed tool calls)."""


class DatasetError(ValueError):
    """A JSONL dataset is missing, empty or has rows of the wrong shape."""


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    file = Path(path)
    if not file.is_file():
        raise DatasetError(f"dataset {file} not found")
    rows = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{file}:{n}: not JSON ({e.msg})") from None
    if not rows:
        raise DatasetError(f"dataset {file} has no rows")
    return rows


@dataclass
class Generation:
    """A response with the engine's facts about it, for length- and budget-aware rewards."""

    text: str
    tokens: int = 0
    thinking_tokens: int = 0
    thinking_budget: int = 0
    truncated: bool = False


class TextEnv(gym.Env, abc.ABC):
    """A text environment: observations are chat messages, actions are response strings."""

    description: ClassVar[str] = ""
    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(
        self,
        dataset: str | None = None,
        difficulty: int = 0,
        max_turns: int = 1,
        rewards: tuple[str, ...] | list[str] = (),
        max_tokens: int = 0,
    ) -> None:
        self.difficulty = difficulty
        self.max_turns = max_turns
        self.reward_specs = list(rewards)
        self.max_tokens = max_tokens
        self.rows = load_jsonl(dataset) if dataset else None
        if self.rows is not None:
            self.rows = [self.check_row(row, i) for i, row in enumerate(self.rows)]
        self.observation_space = spaces.Text(max_length=MAX_TEXT)
        self.action_space = spaces.Text(max_length=MAX_TEXT)
        self.task: Task | None = None
        self.turn = 0
        self.history: list[Message] = []

    # -- what subclasses provide ------------------------------------------------------------
    @abc.abstractmethod
    def generate(self, rng: random.Random) -> Task:
        """A fresh procedural task (seeded through `rng`)."""

    @abc.abstractmethod
    def from_row(self, row: dict[str, Any]) -> Task:
        """A task from one dataset row."""

    def check_row(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        """Validate a dataset row at load time (raise DatasetError naming the row)."""
        return row

    @abc.abstractmethod
    def score_turn(self, action: str) -> TurnResult:
        """Judge one policy turn of the current task."""

    @abc.abstractmethod
    def reference_turn(self) -> str:
        """The response a perfect policy gives at the current turn."""

    # -- gymnasium API ----------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        rng = random.Random(seed if seed is not None else int(self.np_random.integers(1 << 62)))
        if self.rows is not None:
            index = options.get("index", rng.randrange(len(self.rows)))
            if not 0 <= index < len(self.rows):
                raise IndexError(f"index {index} outside the dataset's {len(self.rows)} rows")
            self.task = self.from_row(self.rows[index])
        else:
            self.task = self.generate(rng)
        self.turn = 0
        self.history = []
        if self.task.system:
            self.history.append({"role": "system", "content": self.task.system})
        self.history.append({"role": "user", "content": self.task.prompt})
        return list(self.history), {"answer": self.task.answer, "seed": seed}

    def step(self, action: str | Generation):
        if self.task is None:
            raise RuntimeError("call reset() before step()")
        gen = action if isinstance(action, Generation) else Generation(text=str(action))
        self.turn += 1
        self.history.append({"role": "assistant", "content": gen.text})
        result = self.score_turn(gen.text)
        truncated = not result.done and self.turn >= self.max_turns
        finished = result.done or truncated
        info: dict[str, Any] = {"verdict": result.verdict or ("truncated" if truncated else ""),
                                "turn": self.turn, **result.detail}
        reward = 0.0
        if finished:
            ctx = RewardContext(
                response=gen.text, correct=result.correct, response_tokens=gen.tokens,
                max_tokens=self.max_tokens, thinking_tokens=gen.thinking_tokens,
                thinking_budget=gen.thinking_budget, truncated=gen.truncated, extra=result.detail,
            )
            reward, parts = combine(self.reward_specs, ctx)
            if info["verdict"] in HACK_VERDICTS:  # no bonus for an answer that went for the grader:
                # it must score below an honest wrong answer (which earns the format bonus), not level
                reward -= sum(v for k, v in parts.items() if k != "correct" and v > 0)
                parts = {k: v if k == "correct" or v <= 0 else 0.0 for k, v in parts.items()}
            if result.penalty:
                parts["penalty"] = -result.penalty
                reward -= result.penalty
            info["reward_breakdown"] = parts
        self.history.extend(result.reply)
        return list(result.reply), reward, result.done, truncated, info

    def reference_answer(self) -> str:
        """A response that scores 1.0 at this point of the episode (for SFT data and tests)."""
        if self.task is None:
            raise RuntimeError("call reset() before reference_answer()")
        return self.reference_turn()
