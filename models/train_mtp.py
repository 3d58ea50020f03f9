"""`estuary model train-mtp`: fit MTP heads on a frozen policy from its own generations.

    estuary model train-mtp out/policy --samples 256 --steps 200

The policy (frozen) answers prompts from the registered environments with the torch engine; the
heads learn to predict each generated token two ahead from the token one ahead and the policy's
final hidden state (`models.mtp.mtp_loss`, on the generated tokens only). Heads are created if
the policy has none, and saved beside it (`mtp.safetensors`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.mtp import add_mtp_heads, mtp_logits, mtp_loss, save_mtp_heads
from models.policy import load_policy


@dataclass
class TrainMTPResult:
    loss_start: float
    loss_end: float
    samples: int
    seconds: float


def self_generations(policy, env_ids: list[str], samples: int, max_new_tokens: int, seed: int
                     ) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) of the policy's own answers to environment prompts."""
    import environments
    from rollout.torch_engine import TorchEngine
    from rollout.types import Request, SamplingParams

    rng = random.Random(seed)
    envs = [environments.make(e) for e in env_ids]
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


def train_mtp(policy_dir: str | Path, env_ids: list[str] | None = None, samples: int = 256,
              steps: int = 200, batch_size: int = 32, lr: float = 2e-3, max_new_tokens: int = 64,
              seed: int = 0) -> TrainMTPResult:
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
    for _ in range(steps):
        ids, mask = _batch(rng.sample(rows, min(batch_size, len(rows))), policy.tokenizer.pad_token_id)
        with torch.no_grad():
            hidden = model.model(ids).last_hidden_state
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
