"""Warm-start SFT on the environments' reference answers (the first stage of `estuary train`).

    result = run_sft(policy_dir, cfg.sft, cfg.environments, seed=0)   # trains and saves in place

Examples are whole reference conversations: each environment (drawn by its weight) is reset with
a training seed and answered turn by turn with `reference_answer()`, the environment's replies
in between, so multi-turn tool use is learned as the policy will meet it. Only the assistant's
tokens are trained on.

`sft.drill_rows` adds rows of single-digit arithmetic facts to every batch (`warmstart/drills.py`):
what a pretrained model knows and a preset written from a seed does not. `sft.copy_rows` adds
copy pretraining's random sequences shown twice (`warmstart/copy_pretrain.py`), so SFT keeps the
in-context copying that stage formed: without them, copy accuracy on fresh sequences fell from
0.97 to 0.00-0.06 over SFT in every build measured, and the builds differed in which of the
tasks' copies (a name into a lookup, a number into the answer) survived. `sft.answer_rows` adds
answer drills (`warmstart/drills.py`): a thought of random words ending on a value, and an answer
that copies it into a slot, the copy every environment's answer makes and no induction makes;
answer pretraining (`warmstart/answer_pretrain.py`, `sft.answer_steps`) forms that copy before SFT,
and these rows keep it.

Thinking budgets are shown as rollouts show them: a conversation's budget is stated in its system
message (`rollout.budget.with_budget`) and every thought longer than it is cut there and closed
with `</think>`, the answer following, as budget control would force it. As in Nemotron's
recipe, `cut_fraction` of the conversations that think get a budget below their first thought's
length (so the policy learns to answer after a forced close); the others get one drawn like the
rollouts' (`budget`, often not binding: the policy learns the line is a limit, not a target), or
none when the run has no budgets or the draw says none (`rollout.budget.unbudgeted_fraction`).
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from configs.schema import EnvironmentConfig, SftConfig
from environments import env_factory
from rollout.budget import draw_budget, with_budget
from warmstart.copy_pretrain import copy_row, writable_ids
from warmstart.drills import answer_row, drill_row

_THINK = re.compile(r"<think>(.*?)</think>", re.S)
MICRO_ROWS = 8  # rows per length-sorted micro-batch (batch 16 on 2 cores: 0.62 s/step, 0.77 as one padded batch)


@dataclass
class SftResult:
    loss_start: float
    loss_end: float
    examples: int
    seconds: float


def thought_tokens(text: str, tokenizer) -> int:
    """Tokens between `<think>` and `</think>` (0 without a thought)."""
    match = _THINK.search(text)
    return len(tokenizer.encode(match.group(1), add_special_tokens=False)) if match else 0


def cut_thinking(text: str, tokenizer, budget: int) -> str:
    """Keep the first `budget` tokens of a longer thought and close it with `</think>`."""
    match = _THINK.search(text)
    if match is None:
        return text
    thought = tokenizer.encode(match.group(1), add_special_tokens=False)
    if len(thought) <= budget:
        return text
    kept = tokenizer.decode(thought[:budget])
    return text[: match.start()] + f"<think>{kept}</think>" + text[match.end():]


def conversation_budget(first_answer: str, tokenizer, rng: random.Random, cut: float,
                        budget: tuple[int, int] | None, unbudgeted: float = 0.0) -> int | None:
    """A reference conversation's thinking budget (see the module docstring)."""
    length = thought_tokens(first_answer, tokenizer)
    if length and rng.random() < cut:
        return rng.randrange(length)  # below the thought's length: the close is forced
    return draw_budget(budget, rng, unbudgeted)


def reference_conversation(env, tokenizer, seed: int, rng: random.Random, cut: float,
                           budget: tuple[int, int] | None = None,
                           unbudgeted: float = 0.0) -> tuple[list[int], list[int]]:
    """(token ids, mask with 1 on assistant tokens) of one reference episode."""
    messages, _ = env.reset(seed=seed)
    first = env.reference_answer()
    limit = conversation_budget(first, tokenizer, rng, cut, budget, unbudgeted)
    ids = list(tokenizer.apply_chat_template(with_budget(messages, limit), add_generation_prompt=True,
                                             return_dict=False))
    mask = [0] * len(ids)
    turns = max(1, env.max_turns)
    for index in range(turns):
        answer = env.reference_answer() if index else first
        if limit is not None:  # budget control closes every turn's thought at the budget
            answer = cut_thinking(answer, tokenizer, limit)
        turn = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        ids, mask = ids + turn, mask + [1] * len(turn)
        if index == turns - 1:
            break  # the episode ends after its last turn: scoring it (a sandbox run for code) adds nothing
        reply, _, terminated, truncated, _ = env.step(answer)
        if terminated or truncated or not reply:
            break
        rendered = tokenizer.apply_chat_template(reply, add_generation_prompt=True, tokenize=False)
        more = tokenizer.encode("\n" + rendered, add_special_tokens=False)
        ids, mask = ids + more, mask + [0] * len(more)
    return ids, mask


def reference_rows(tokenizer, envs: dict[str, EnvironmentConfig], per_env: int, seed: int, seed_limit: int,
                   cut: float = 0.0, budget: tuple[int, int] | None = None,
                   unbudgeted: float = 0.0) -> list[tuple[list[int], list[int], str]]:
    """`per_env` reference conversations of each environment (training seeds, budgets as SFT
    shows them): (token ids, mask with 1 on assistant tokens, env id) for `learner.reference_kl`."""
    rng = random.Random(f"reference-kl-{seed}")
    rows = []
    for env_cfg in envs.values():
        env = env_factory(env_cfg)()
        for _ in range(per_env):
            ids, mask = reference_conversation(env, tokenizer, rng.randrange(seed_limit), rng, cut, budget, unbudgeted)
            rows.append((ids, mask, env_cfg.id))
    return rows


def _batch(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for r, (tokens, m) in enumerate(rows):
        ids[r, : len(tokens)], mask[r, : len(m)] = torch.tensor(tokens), torch.tensor(m, dtype=torch.float)
    return ids, mask


def sft_loss(model, ids: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the masked tokens given their prefixes (mean, or sum); ids, mask (B, T)."""
    logits = model(ids).logits[:, :-1].float()  # (B, T-1, V) predicts tokens 1..T-1
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    weights = mask[:, 1:].reshape(-1)
    total = (losses * weights).sum()
    return total if reduction == "sum" else total / weights.sum().clamp(min=1)


def accumulate(model, rows: list[tuple[list[int], list[int]]], pad: int, micro_rows: int) -> float:
    """Back-propagate the mean token loss of `rows` in length-sorted micro-batches; returns it.

    The gradient is the one a single padded batch gives (summed token losses over the batch's
    trained tokens), but rows of similar length share a micro-batch, so little compute goes
    to padding: reference conversations range from ~60 tokens (math) to ~300 (tool use).
    """
    rows = sorted(rows, key=lambda r: len(r[0]))
    trained = sum(sum(m[1:]) for _, m in rows) or 1
    total = 0.0
    for start in range(0, len(rows), micro_rows):
        ids, mask = _batch(rows[start: start + micro_rows], pad)
        loss = sft_loss(model, ids, mask, reduction="sum") / trained
        loss.backward()
        total += loss.item()
    return total


def train_step(model, opt, rows: list[tuple[list[int], list[int]]], pad: int) -> float:
    """One optimizer step on `rows` (`accumulate`'s loss, the gradient clipped to norm 1); returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss = accumulate(model, rows, pad, MICRO_ROWS)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def sft_lr(cfg: SftConfig, step: int) -> float:
    """The learning rate at `step`: a linear warm-up over `cfg.warmup_steps` (Adam's first steps are
    sign-like, so each moves every weight by about lr), then a linear decay to 10% at the last step
    (the last steps settle the policy)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return cfg.lr * warm * (1 - 0.9 * step / max(1, cfg.steps))


def run_sft(policy_dir: str | Path, cfg: SftConfig, envs: dict[str, EnvironmentConfig], seed: int = 0,
            seed_limit: int = 1_000_000, budget: tuple[int, int] | None = None,
            unbudgeted: float = 0.0) -> SftResult:
    """`budget`: the rollouts' thinking-budget range (`rollout.worker.budget_range`), None without;
    `unbudgeted`: the share of prompts the rollouts give no budget."""
    from models.policy import load_policy

    start = time.perf_counter()
    policy = load_policy(policy_dir)
    model, tok = policy.model, policy.tokenizer
    rng = random.Random(seed)
    names = [n for n in envs if envs[n].weight > 0]
    made = {n: env_factory(envs[n])() for n in names}
    rows = []
    for _ in range(cfg.steps * cfg.batch_size // 2 or 1):  # each example is seen about twice
        name = rng.choices(names, weights=[envs[n].weight for n in names])[0]
        rows.append(reference_conversation(made[name], tok, rng.randrange(seed_limit), rng, cfg.cut_fraction,
                                           budget, unbudgeted))
    vocab = writable_ids(tok)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = []
    for step in range(cfg.steps):
        batch = rng.sample(rows, min(cfg.batch_size, len(rows)))
        batch += [drill_row(tok, rng) for _ in range(cfg.drill_rows)]
        batch += [copy_row(vocab, cfg.copy_length, rng) for _ in range(cfg.copy_rows)]
        batch += [answer_row(tok, rng) for _ in range(cfg.answer_rows)]
        for group in opt.param_groups:
            group["lr"] = sft_lr(cfg, step)
        losses.append(train_step(model, opt, batch, tok.pad_token_id))
    model.eval()
    policy.save(policy_dir)
    head = max(1, len(losses) // 10)
    return SftResult(sum(losses[:head]) / head, sum(losses[-head:]) / head, len(rows), time.perf_counter() - start)
