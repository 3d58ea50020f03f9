"""Reasoning-budget control as a vLLM (V1) logits processor.

A request opts in through `SamplingParams.extra_args[BUDGET_KEY]` (budget, grace, the `<think>`
and `</think>` ids, newline token ids, the prompt). The processor keeps a `BudgetControl` state
per batch row, advances it over the row's new output tokens before every step, and where the
rule says so leaves `</think>` as the only possible token.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from rollout.budget import BudgetControl, BudgetState

BUDGET_KEY = "estuary_budget"


class _Row:
    def __init__(self, spec: dict[str, Any], output: list[int]) -> None:
        self.control = BudgetControl(spec["open"], spec["close"], set(spec["newlines"]))
        self.state: BudgetState = self.control.start(spec["budget"], spec["grace"], spec["prompt"])
        self.output = output  # vLLM's live list of the request's generated tokens
        self.seen = 0

    def forced(self) -> int | None:
        for token in self.output[self.seen:]:
            self.control.observe(self.state, token)
        self.seen = len(self.output)
        return self.control.forced_token(self.state)


class BudgetLogitsProcessor(LogitsProcessor):
    """Forces `</think>` once a request's thinking budget (plus grace) is spent."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, _Row] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # forcing changes the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, output in batch_update.added:
            spec = (params.extra_args or {}).get(BUDGET_KEY) if params is not None else None
            if spec is not None and spec.get("budget") is not None:
                self.rows[index] = _Row(spec, output)
            else:
                self.rows.pop(index, None)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if direction == MoveDirectionality.SWAP and row_b is not None:
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, row in self.rows.items():
            token = row.forced()
            if token is not None and index < logits.shape[0]:
                logits[index] = float("-inf")
                logits[index, token] = 0.0
        return logits
