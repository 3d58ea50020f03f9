"""Answer pretraining: copying a value into a new slot, at copy pretraining's pace, before SFT.

    result = run_answer_pretraining(policy_dir, steps=600, lr=1e-3, seed=0)

Every environment's answer copies a value its thought ended on into a slot (`is 3076.</think>
\\boxed{3076}`, a looked-up title into `{"title": "Zordun"}`). That copy is not induction: the
slot's opening (`{`, `"`) never preceded the value before, so a head that copies what followed
the current token cannot find the value's first token. SFT's answer drills (`sft.answer_rows`)
formed it in the seed-1 and seed-2 builds and not in seed 0's, whose SFT ended with the drills'
loss near 1.0 (0.1-0.2 elsewhere) and tool_use at 0 (README, "Session 41"). Like the copy circuit,
it forms suddenly and at a low learning rate (SFT's 3e-3 did not form it in seed 0's 400 steps; at
1e-3 this stage had the first copied token right 0.94-0.95 after 600 steps in one-thread builds;
in the two-thread quick start 0.14 with transformers' Mamba scan, whose float path reached the
sudden step later and whose SFT then completed it, and 0.92 with ours), so it gets a stage of its own between copy pretraining and SFT: batches of answer drills
(`warmstart/drills.py`, trained on the copy only) and copy sequences (so the copying it stands on
stays), at `sft.copy_lr`. It reads no task, prompt or evaluation data.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from warmstart.copy_pretrain import copy_row, writable_ids
from warmstart.drills import answer_row
from warmstart.sft import _batch, train_step

ANSWER_DRILLS = 4  # answer drill rows per batch (8 lines each, ~380 tokens)
COPY_SEQUENCES = 8  # copy pretraining's sequences per batch, so the copy circuit stays


@dataclass
class AnswerResult:
    loss_start: float
    loss_end: float
    accuracy: float
    """Share of held-back answer drills whose copy's first token is predicted right (greedy): the
    token induction cannot give."""
    seconds: float


def first_token_accuracy(model, rows: list[tuple[list[int], list[int]]], pad: int) -> float:
    """Greedy accuracy on the first trained token of each trained span of `rows` (ids, mask)."""
    ids, mask = _batch(rows, pad)  # (B, T)
    with torch.no_grad():
        predicted = model(ids).logits[:, :-1].argmax(-1)  # (B, T-1) position t predicts t+1
    trained = mask[:, 1:] > 0  # (B, T-1)
    before = torch.cat([torch.zeros_like(trained[:, :1]), trained[:, :-1]], dim=1)
    first = trained & ~before  # a span's first token: trained, its predecessor not
    return (predicted[first] == ids[:, 1:][first]).float().mean().item()


def run_answer_pretraining(policy_dir: str | Path, steps: int, lr: float = 1e-3, length: int = 24,
                           seed: int = 0) -> AnswerResult:
    """Train the policy in `policy_dir` in place on answer drills (and copying); returns the loss
    and the first copied token's accuracy on 32 drills none of its batches held."""
    from models.policy import load_policy

    start = time.perf_counter()
    policy = load_policy(policy_dir)
    model, tok = policy.model, policy.tokenizer
    rng = random.Random(f"answer-pretraining-{seed}")
    vocab = writable_ids(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        batch = [answer_row(tok, rng) for _ in range(ANSWER_DRILLS)]
        batch += [copy_row(vocab, length, rng) for _ in range(COPY_SEQUENCES)]
        losses.append(train_step(model, opt, batch, tok.pad_token_id))
    model.eval()
    held = random.Random(f"answer-pretraining-held-{seed}")
    accuracy = first_token_accuracy(model, [answer_row(tok, held) for _ in range(32)], tok.pad_token_id)
    policy.save(policy_dir)
    head = max(1, len(losses) // 10)
    return AnswerResult(sum(losses[:head]) / head, sum(losses[-head:]) / head, accuracy,
                        time.perf_counter() - start)
