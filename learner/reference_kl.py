"""The KL to the warm start on the environments' reference answers (`learner.reference_kl_coef`).

    rows = source.rows(tokenizer)                   # ReferenceSource: (ids, mask, env id), built once
    anchor = ReferenceSet(rows, per_step=6, coefs={"estuary/code": 0.3}, seed=0)
    loss, stats = anchor.loss(module, model, reference, temperature=1.0, device="cpu")

Every step a few reference conversations (training seeds, drawn round-robin over the
environments) are teacher-forced through the policy and the frozen reference, and the loss adds
the exact KL(pi || ref) of the next-token distribution at each answer position, weighted by its
environment's `reference_kl_coef`, averaged over those positions (`learner.losses.full_kl`).

Why, when the on-policy KL term exists: that term only reaches the contexts the policy samples
now, in the groups that train. In the quick start code collapsed by one near-certain token of the
answer's skeleton losing its mass within ~15 steps (`def add_k(x` -> ` a`, not `):`; README,
"Session 36"); the code groups then all failed, dynamic sampling dropped them, and nothing pulled
the token back. These contexts are fixed and always in the loss: the term is 0 with its gradient
while the policy keeps the warm start's distribution there, and grows the step a skeleton token
starts to move. It pays for nothing the reward decides (the reference answer's tokens are not
pushed up, only the distribution at them held), like the on-policy KL. Its per-environment value
is also the run's monitor of that drift (`learner/reference_kl/<env>` in MLflow).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from configs.schema import EnvironmentConfig
from learner.losses import full_kl

Row = tuple[list[int], list[int], str]  # (token ids, 1 on the answer's tokens, env id)


@dataclass(frozen=True)
class ReferenceSource:
    """Where the pool comes from: built by the learner itself (a few thousand token ids per
    environment would make its actor's arguments too big to pass inline, and Ray may then fail
    to restart it)."""

    envs: dict[str, EnvironmentConfig]
    """The environments whose reference conversations form the pool."""
    per_env: int
    """Conversations of each environment in the pool."""
    seed: int
    """Seeds the pool's draw of training seeds and budgets."""
    seed_limit: int
    """Training seeds stay below it (`eval.seed_offset`: the held-out seeds start there)."""
    cut: float = 0.0
    """Share of conversations whose thought is cut by a budget below its length (`sft.cut_fraction`)."""
    budget: tuple[int, int] | None = None
    """The rollouts' thinking-budget range (None: no budgets)."""
    unbudgeted: float = 0.0
    """Share of conversations stated without a budget."""

    def rows(self, tokenizer) -> list[Row]:
        from warmstart.sft import reference_rows

        return reference_rows(tokenizer, self.envs, self.per_env, self.seed, self.seed_limit, self.cut,
                              self.budget, self.unbudgeted)


def collate(rows: list[Row], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids (B, T), mask (B, T) float) of `rows`."""
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for r, (tokens, m, _) in enumerate(rows):
        ids[r, : len(tokens)] = torch.tensor(tokens)
        mask[r, : len(m)] = torch.tensor(m, dtype=torch.float)
    return ids, mask


def reference_kl(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                 coefs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits, ref_logits (B, T, V), mask (B, T), coefs (B,) or None (1s) -> (the coefficient-
    weighted mean KL over the masked positions (scalar), each row's plain mean (B,)). Position t
    is the distribution that predicted token t."""
    kl = full_kl(logits, ref_logits, temperature) * mask  # (B, T)
    per_row = kl.sum(1) / mask.sum(1).clamp(min=1)  # (B,)
    weighted = kl.sum(1) if coefs is None else kl.sum(1) * coefs  # (B,)
    return weighted.sum() / mask.sum().clamp(min=1), per_row


class ReferenceSet:
    """A fixed pool of reference conversations, `per_step` of them drawn for each optimizer step."""

    def __init__(self, rows: list[Row], per_step: int, coefs: dict[str, float], seed: int = 0, pad: int = 0) -> None:
        self.coefs = coefs  # env id -> its reference_kl_coef; an environment at 0 is left out
        self.by_env: dict[str, list[Row]] = {}
        for row in rows:
            if coefs.get(row[2], 0.0) > 0:
                self.by_env.setdefault(row[2], []).append(row)
        if not self.by_env:
            raise ValueError("learner.reference_kl_coef > 0 needs reference conversations: no environment "
                             "with a weight > 0 and a reference_kl_coef > 0 gave one")
        self.envs = sorted(self.by_env)
        self.per_step, self.pad = per_step, pad
        self.rng = random.Random(seed)
        self.turn = 0  # the environment the next draw starts at: every one comes round equally

    def draw(self) -> list[Row]:
        rows = []
        for i in range(self.per_step):
            env = self.envs[(self.turn + i) % len(self.envs)]
            rows.append(self.rng.choice(self.by_env[env]))
        self.turn = (self.turn + self.per_step) % len(self.envs)
        return rows

    def loss(self, module, model, reference, temperature: float, device) -> tuple[torch.Tensor, dict[str, float]]:
        """(mean KL over the drawn rows' answer positions, statistics) with gradients into `module`
        (the DeepSpeed engine or the model); `reference` may be a ZeRO-3 engine (its forward is a
        collective: every rank draws and runs the same number of rows)."""
        rows = self.draw()
        ids, mask = collate(rows, self.pad)
        ids, mask = ids.to(device), mask.to(device)
        coefs = torch.tensor([self.coefs[r[2]] for r in rows], device=device)
        logits = module(ids).logits  # (B, T, V)
        with torch.no_grad():
            ref_logits = reference(ids).logits
        loss, per_row = reference_kl(logits, ref_logits, mask, temperature, coefs)
        per_row = per_row.detach()
        stats = {"reference_kl": float((per_row * mask.sum(1)).sum() / mask.sum().clamp(min=1))}
        for env in {r[2] for r in rows}:
            chosen = [float(k) for k, r in zip(per_row, rows, strict=True) if r[2] == env]
            stats[f"reference_kl/{env.rsplit('/', 1)[-1]}"] = sum(chosen) / len(chosen)
        return loss, stats
