"""Self-speculative decoding for the torch engine: MTP drafts, one verification pass, exact accept.

Each active sequence holds a `pending` token (emitted, not yet fed) and the target's hidden
state at its last fed position. One step: the MTP head drafts K tokens (the draft governor
chooses K per step, up to `mtp_steps`) from (pending, hidden);
the target verifies [pending, d1..dK] in one batched pass; `speculative_accept` keeps a prefix
of the drafts and samples one more token from the residual (or the bonus position); the
recurrent state rolls back to the last kept position. Tokens are distributed exactly as without
drafts, and their log-probs come from the target.

Rows that budget control may force within the window, or that asked for expert routing, take a
plain step (one token sampled from the target) in the same verification pass.
"""

from __future__ import annotations

import torch

from rollout.sampling import processed_for, sample
from rollout.speculative import speculative_accept


@torch.no_grad()
def draft(decoder, tokens: torch.Tensor, hidden: torch.Tensor, steps: int, params: list,
          generator: torch.Generator, head=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K draft tokens per row from the MTP head: (drafts (B, K), their log-dists (B, K, V), hidden).
    `head`: an `Int8DraftHead` to draft through instead of the fp32 weights (the log-dists are
    then its own, which is what the acceptance test needs)."""
    model = decoder.model
    embed = model.get_input_embeddings()
    drafts, dists = [], []
    h, tok = hidden, tokens
    for _ in range(steps):
        if head is None:
            h = decoder.mtp_step(embed(tok), h)
            logits = model.lm_head(h)
        else:
            h = head.step(embed(tok), h)
            logits = head.logits(h)
        lp = processed_for(logits, params)
        tok, _ = sample(lp, generator)
        drafts.append(tok)
        dists.append(lp)
    return torch.stack(drafts, 1), torch.stack(dists, 1), h


def can_draft(seq, k: int) -> bool:
    """No forcing can happen within the next k+1 tokens, and no routing was asked for."""
    b = seq.budget
    safe = b.budget is None or not b.thinking or b.used + k + 1 < b.budget
    return safe and seq.routing is None


def hidden_rows(rows: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """(hidden states of a pass, row) per sequence -> (B, D); one `index_select` where all rows
    come from one pass, as they do once a batch has drafted a step together."""
    first = rows[0][0]
    if all(h is first for h, _ in rows):
        return first.index_select(0, torch.tensor([i for _, i in rows], device=first.device))
    return torch.stack([h[i] for h, i in rows])


def spec_step(engine, active: list, k: int) -> list:
    """One speculative step, `k` drafts deep (1..engine.mtp_steps), for sequences that all have a
    pending token; returns finished ones."""
    dev = engine.device
    slots = torch.tensor([s.slot for s in active], device=dev)
    params = [s.request.params for s in active]
    pending = torch.tensor([s.pending for s in active], device=dev)
    hidden = hidden_rows([s.hidden for s in active])  # (B, D)
    drafts, draft_lp, _ = draft(engine.decoder, pending, hidden, k, params, engine._gen, engine.draft_head)
    logits, new_hidden, saved = engine.decoder.verify(state=engine.state, slots=slots,
                                                      tokens=torch.cat([pending[:, None], drafts], 1))
    target_lp = processed_for(logits, params)  # (B, K+1, V)
    accepted, tokens, token_lp = speculative_accept(target_lp, draft_lp, drafts, engine._gen)
    flags = [can_draft(s, k) for s in active]
    if not all(flags):  # those rows take one token sampled from the target instead
        eligible = torch.tensor(flags, device=dev)
        plain_tok, plain_lp = sample(target_lp[:, 0], engine._gen)
        accepted = torch.where(eligible, accepted, torch.zeros_like(accepted))
        tokens[:, 0] = torch.where(eligible, tokens[:, 0], plain_tok)
        token_lp[:, 0] = torch.where(eligible, token_lp[:, 0], plain_lp)
    acc, toks, lps = accepted.tolist(), tokens.tolist(), token_lp.tolist()
    engine.stats["drafted"] += sum(flags) * k
    engine.stats["accepted"] += sum(acc)
    engine.stats["steps"] += sum(flags)
    engine.stats[f"steps_k{k}"] = engine.stats.get(f"steps_k{k}", 0) + sum(flags)  # how often each depth ran
    keep, finished = [], []
    for i, seq in enumerate(active):
        emitted = 0
        for j in range(acc[i] + 1):
            forced = engine.budget.forced_token(seq.budget)
            token = forced if forced is not None else toks[i][j]
            engine._emit(seq, token, 0.0 if forced is not None else lps[i][j], forced is not None)
            emitted += 1
            if seq.finish is not None or forced is not None:
                break
        # fed: pending + the drafts kept before the last emitted token
        keep.append(emitted)
        seq.pending = seq.tokens[-1]
        if seq.finish is not None:
            finished.append(seq)
    kept = torch.tensor(keep, device=dev)
    last_fed = new_hidden[torch.arange(len(active), device=dev), kept - 1]  # (B, D): one gather
    for i, seq in enumerate(active):
        seq.hidden = (last_fed, i)
    engine.decoder.rollback(engine.state, slots, kept, saved)
    return finished
