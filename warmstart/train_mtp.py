"""`estuary model train-mtp`: fit MTP heads on a frozen policy from its own generations.

    estuary model train-mtp out/policy --samples 256 --steps 200

The policy (frozen) answers prompts from the registered environments with the torch engine; the
heads learn, on the generated tokens only, to predict two ahead from the token one ahead and the
policy's final hidden state. `objective="distill"` (the default) matches the policy's own
distribution there, through `unroll` chained draft steps as the engine drafts
(`models.mtp.mtp_distill_loss`); `"tokens"` is the cross-entropy of the sampled tokens, first
step only (`models.mtp.mtp_loss`; `unroll` does not apply). Heads are created if the policy has
none, and saved beside it (`mtp.safetensors`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.mtp import add_mtp_heads, mtp_distill_loss, mtp_logits, mtp_loss, save_mtp_heads
from models.policy import load_policy

OBJECTIVES = ("distill", "tokens")


@dataclass
class TrainMTPResult:
    loss_start: float
    loss_end: float
    samples: int
    seconds: float


def self_generations(policy, env_ids: list[str | tuple[str, dict]], samples: int, max_new_tokens: int, seed: int
                     ) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) of the policy's own answers to environment prompts."""
    import environments
    from rollout.torch_engine import TorchEngine
    from rollout.types import Request, SamplingParams

    rng = random.Random(seed)
    # An entry is an id, or (id, kwargs) as a run's config gives it (e.g. a short long-context length).
    envs = [environments.make(e) if isinstance(e, str) else environments.make(e[0], **e[1]) for e in env_ids]
    prompts = []
    for i in range(samples):
        messages, _ = envs[i % len(envs)].reset(seed=rng.randrange(1 << 30))
        prompts.append(policy.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                            return_dict=False))
    longest = max(len(p) for p in prompts) + max_new_tokens + 1
    engine = TorchEngine(policy, max_batch=min(64, samples), max_len=longest, seed=seed)
    out = engine.generate([Request(p, SamplingParams(max_new_tokens=max_new_tokens)) for p in prompts])
    return [(p + s[0].token_ids, len(p)) for p, s in zip(prompts, out, strict=True)]


def _batch(rows: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (tokens, prompt_len) in enumerate(rows):
        ids[r, : len(tokens)] = torch.tensor(tokens)
        mask[r, prompt_len: len(tokens)] = 1  # generated tokens are the targets
    return ids, mask


@torch.no_grad()
def _with_hidden(model, rows: list[tuple[list[int], int]], pad: int, chunk: int = 16) -> list[tuple]:
    """The frozen policy's final hidden states, computed once per row and cropped to the answer.

    The head sees one position at a time (the token one ahead and the hidden state), so a row
    needs only the span from two tokens before the answer; each training step then costs the
    head alone, never another pass of the policy.
    """
    out = []
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for at in range(0, len(order), chunk):
        part = [rows[i] for i in order[at: at + chunk]]
        ids, _ = _batch(part, pad)
        hidden = model.model(ids).last_hidden_state
        for r, (tokens, prompt_len) in enumerate(part):
            start = max(0, prompt_len - 2)
            out.append((torch.tensor(tokens[start:]), hidden[r, start: len(tokens)], prompt_len - start))
    return out


def _head_batch(rows: list[tuple], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    hidden = torch.zeros(len(rows), width, rows[0][1].shape[-1], dtype=rows[0][1].dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (tokens, h, first) in enumerate(rows):
        ids[r, : len(tokens)], hidden[r, : len(tokens)] = tokens, h
        mask[r, first: len(tokens)] = 1
    return ids, hidden, mask


def train_mtp(policy_dir: str | Path, env_ids: list[str | tuple[str, dict]] | None = None, samples: int = 256,
              steps: int = 200, batch_size: int = 32, lr: float = 2e-3, max_new_tokens: int = 64,
              seed: int = 0, objective: str = "distill", unroll: int = 2) -> TrainMTPResult:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if unroll < 1:
        raise ValueError(f"unroll={unroll}: the draft steps to train, at least 1 (the engine's mtp_steps)")
    start = time.perf_counter()
    policy = load_policy(policy_dir)
    model = policy.model
    if getattr(model, "mtp", None) is None:
        add_mtp_heads(model, seed=seed)
    rows = self_generations(policy, env_ids or ["estuary/math", "estuary/code", "estuary/tool_use"],
                            samples, max_new_tokens, seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.mtp.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.mtp.parameters(), lr=lr)
    rng = random.Random(seed)
    losses = []
    pad = policy.tokenizer.pad_token_id
    cached = _with_hidden(model, rows, pad)
    for _ in range(steps):
        ids, hidden, mask = _head_batch(rng.sample(cached, min(batch_size, len(cached))), pad)
        if objective == "distill":
            loss = mtp_distill_loss(model, ids, hidden, mask, steps=unroll)
        else:
            loss = mtp_loss(mtp_logits(model, ids, hidden), ids, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.mtp.requires_grad_(False)
    save_mtp_heads(model, policy_dir)
    head = max(1, len(losses) // 10)
    return TrainMTPResult(sum(losses[:head]) / head, sum(losses[-head:]) / head, len(rows),
                          time.perf_counter() - start)
