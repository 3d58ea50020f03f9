"""One micro-batch's training loss: the GRPO policy loss plus KL, MoE balance and MTP terms.

    loss, stats = microbatch_loss(module, model, batch, objective, ref_model=None)

`module` is what runs the forward pass (the DeepSpeed engine, or the model itself); `model` is
the underlying HF model, whose routers and MTP head are tapped. Terms:

- policy loss (`learner.losses.policy_loss`) on policy-sampled tokens, with every log-prob
  (current, proximal, reference) taken under the sampler's processing: logits / `temperature`,
  then the same top-k / top-p truncation and renormalisation as `rollout.sampling`, so the
  ratio to the engine's behaviour log-probs is 1 for unchanged weights. A sampled token outside
  the current nucleus (the weights moved since it was drawn) has log-prob -inf: it would carry
  no gradient, so it leaves the loss mask (counted as `outside_nucleus`). With the decoupled
  objective the proximal log-probs are `batch.prox_logp` when the trainer recomputed them
  (several optimizer steps per batch), else the current weights' own (one step per batch: the
  proximal policy *is* the current one, so no second forward pass is needed);
- `kl_coef` * the KL to a frozen reference model (`kl_estimator`: k2 by default, see `losses.kl_penalty`);
- `load_balance_coef` * the MoE balance loss over the trunk's routers, on router logits
  recomputed from detached inputs (`RouterTap.balance_logits`): it moves the routers only;
- `mtp_coef` * the MTP heads' KL from the policy's own next-token distributions on policy tokens,
  chained through `mtp_steps` draft steps as the engine drafts (`models.mtp.mtp_distill_loss`,
  as the warm start fits them). The policy's hidden states are detached for it and its
  embeddings and `lm_head` are used as constants: the heads follow the policy, and the policy
  gradient stays the RL objective's.

With `routing_replay`, the forward pass uses the experts the engine recorded (`batch.routed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from learner.batching import MicroBatch
from learner.logprobs import chunked_logprobs, logprobs_from_logits
from learner.losses import LossConfig, full_kl, load_balance_loss, policy_loss
from models.routing import RouterTap

__all__ = ["Objective", "forward", "logprobs_from_logits", "microbatch_loss", "policy_logprobs", "reference_logprobs"]


@dataclass(frozen=True)
class Objective:
    loss: LossConfig = field(default_factory=LossConfig)
    decoupled: bool = True
    load_balance_coef: float = 0.0
    mtp_coef: float = 0.0
    mtp_steps: int = 1
    """Draft steps the MTP term chains (`model.mtp_steps`): each depth the engine may draft is trained."""
    routing_replay: bool = False
    temperature: float = 1.0
    """The sampler's temperature (`rollout.sampling.temperature`); log-probs are of logits / it."""
    top_p: float = 1.0
    """The sampler's nucleus mass (`rollout.sampling.top_p`; 1.0: no truncation)."""
    top_k: int = 0
    """The sampler's top-k (`rollout.sampling.top_k`; 0: no truncation)."""
    logprob_chunk: int = 0
    """Positions whose logits exist at once (`learner.logprobs.chunked_logprobs`); 0: all."""

    @property
    def truncates(self) -> bool:
        return self.top_p < 1.0 or self.top_k > 0


def _replay(batch: MicroBatch) -> list[torch.Tensor] | None:
    if batch.routed is None:
        return None
    b, t, layers, k = batch.routed.shape
    flat = batch.routed.reshape(b * t, layers, k).long()
    return [flat[:, layer] for layer in range(layers)]


def forward(module, model, batch: MicroBatch, objective: Objective, hidden: bool = False):
    """Run the policy on a micro-batch: (logits (B, T-s, V), final normed hidden (B, T-s, D) or
    None, RouterTap, s), for the positions s..T-1 of every row.

    s is 0 unless the rows share a prompt (`batch.prefix_len` P): then the prompt runs once, its
    cache is branched into the rows (`models.prefix_cache`), and s = P - 2, one before the first
    position whose output any loss reads (P - 1: the policy's token P; the MTP term counts only
    drafts that read the policy's tokens, from P - 1 on; until session 44 it read hidden P - 2).
    """
    replay = _replay(batch) if objective.routing_replay else None
    chunked = objective.logprob_chunk > 0
    hidden = hidden or chunked  # chunked log-probs run the output head on the hidden states
    keep = _NO_LOGITS if chunked else 0  # transformers' logits_to_keep (0: every position)
    captured = []
    # The trunk's output (after its final norm) is what the MTP head reads; a hook takes it from
    # the forward pass instead of asking transformers for every layer's hidden states.
    handle = model.model.register_forward_hook(lambda _m, _i, o: captured.append(o.last_hidden_state)) \
        if hidden else None
    try:
        with RouterTap(model, replay=replay) as tap:
            if batch.prefix_len:
                logits, start = _shared_prompt_forward(module, model, batch, chunked), batch.prefix_len - 2
            else:
                logits, start = module(batch.input_ids, logits_to_keep=keep).logits, 0
    finally:
        if handle is not None:
            handle.remove()
    logits = None if chunked else logits
    if not captured:
        return logits, None, tap, start
    if batch.prefix_len:  # (1, P, D) then (B, T-P, D): the prompt's last two positions, then the rows'
        rows = batch.input_ids.shape[0]
        return logits, torch.cat([captured[0][:, -2:].expand(rows, -1, -1), captured[1]], dim=1), tap, start
    return logits, captured[-1], tap, start


# logits_to_keep selecting no position: the forward pass stops at the final hidden states.
_NO_LOGITS = torch.zeros(0, dtype=torch.long)


def _shared_prompt_forward(module, model, batch: MicroBatch, chunked: bool = False) -> torch.Tensor:
    """Logits (B, T-P+2, V) of positions P-2..T-1, the prompt (P tokens) run once for all B rows
    (`chunked`: none, the head runs later on the hidden states)."""
    from models.prefix_cache import branch_cache

    if model.training and getattr(model, "is_gradient_checkpointing", False):
        # transformers' checkpointed layers drop the cache: the rows would run without their prompt
        raise ValueError("a shared prompt needs the layers' cache, which activation checkpointing drops: "
                         "pack with learner.share_prompt=false")
    p, rows = batch.prefix_len, batch.input_ids.shape[0]
    keep = _NO_LOGITS if chunked else 0
    prompt = module(batch.input_ids[:1, :p], use_cache=True, logits_to_keep=_NO_LOGITS if chunked else 2)  # (1, 2, V)
    cache = branch_cache(prompt.past_key_values, rows)
    tail = module(batch.input_ids[:, p:], past_key_values=cache, use_cache=True, logits_to_keep=keep).logits
    return torch.cat([prompt.logits.expand(rows, -1, -1), tail], dim=1)  # (B, T-P+2, V)


def policy_logprobs(module, model, batch: MicroBatch, objective: Objective, hidden: bool = False):
    """(log-probs (B, T), entropy (B, T), hidden window or None, RouterTap, s) under the sampler's
    processing; positions before s (prompt tokens when the prompt is shared) get 0."""
    return policy_outputs(module, model, batch, objective, hidden)[1:]


def policy_outputs(module, model, batch: MicroBatch, objective: Objective, hidden: bool = False):
    """`policy_logprobs` with the logits (B, T-s, V) in front (None when chunked)."""
    logits, states, tap, start = forward(module, model, batch, objective, hidden=hidden)
    ids, sampler = batch.input_ids[:, start:], (objective.temperature, objective.top_p, objective.top_k)
    if logits is None:  # chunked: from the hidden states, a chunk of positions at a time
        logp, entropy = chunked_logprobs(model.lm_head, states, ids, objective.logprob_chunk, *sampler)
    else:
        logp, entropy = logprobs_from_logits(logits, ids, *sampler)  # (B, T-s) each
    if start:
        logp, entropy = F.pad(logp, (start, 0)), F.pad(entropy, (start, 0))
    return logits, logp, entropy, states, tap, start


@torch.no_grad()
def reference_logprobs(model, batch: MicroBatch, objective: Objective) -> torch.Tensor:
    """(B, T) log-probs under `model` without gradients (the proximal or reference policy); `model`
    may be a DeepSpeed engine (a ZeRO-3 sharded reference), which runs the forward pass."""
    return policy_logprobs(model, getattr(model, "module", model), batch, objective)[0]


def _full_kl(ref_model, batch: MicroBatch, objective: Objective, logits: torch.Tensor | None,
             start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference log-probs (B, T), exact KL(pi || ref) per position (B, T)) for `kl_estimator:
    full`: the reference's whole distributions against the policy's `logits` (positions s..T-1)."""
    if logits is None:
        raise ValueError("learner.kl_estimator=full needs the logits: set learner.logprob_chunk=0")
    with torch.no_grad():
        ref_logits, ref, *_ = policy_outputs(ref_model, getattr(ref_model, "module", ref_model), batch, objective)
    kl = full_kl(logits, ref_logits, objective.temperature)  # (B, T-s)
    return ref, F.pad(kl, (start, 0)) if start else kl


def _within_nucleus(mask: torch.Tensor, *logps: torch.Tensor | None):
    """mask (B, T) without tokens whose log-prob is -inf in any of `logps`, and the `logps` with
    those -inf replaced by 0 (so that masked sums stay finite: 0 * -inf is NaN)."""
    ok = torch.ones_like(mask, dtype=torch.bool)
    for lp in logps:
        if lp is not None:
            ok &= torch.isfinite(lp)
    return mask * ok, [None if lp is None else lp.masked_fill(~ok, 0.0) for lp in logps]


def _needs_reference(ref_model, batch: MicroBatch, objective: Objective) -> bool:
    """Whether a micro-batch needs the reference's forward pass: some row has a KL term. A batch of
    environments without one (long_context in the demo, its groups the longest) skips it; the
    loss is the same, and `kl` is then reported over the rows the term applies to. A ZeRO-3
    sharded reference (a DeepSpeed engine) always runs: its forward pass is a collective that
    every rank must make as often as the others."""
    if ref_model is None:
        return False
    if hasattr(ref_model, "module"):
        return True
    if batch.kl_coef is None:
        return objective.loss.kl_coef > 0
    return bool((batch.kl_coef > 0).any())


def microbatch_loss(module, model, batch: MicroBatch, objective: Objective, ref_model=None
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    want_mtp = objective.mtp_coef > 0 and getattr(model, "mtp", None) is not None
    logits, logp, entropy, hidden, tap, start = policy_outputs(module, model, batch, objective, hidden=want_mtp)
    prox = None
    if objective.decoupled:
        prox = batch.prox_logp if batch.prox_logp is not None else logp.detach()
    ref = kl_tokens = None
    if _needs_reference(ref_model, batch, objective):
        if objective.loss.kl_estimator == "full":
            ref, kl_tokens = _full_kl(ref_model, batch, objective, logits, start)
        else:
            ref = reference_logprobs(ref_model, batch, objective)
    mask, trained = batch.loss_mask, batch.loss_mask
    if objective.truncates:
        trained, (logp, prox, ref) = _within_nucleus(mask, logp, prox, ref)
    loss, stats = policy_loss(logp, batch.behav_logp, batch.advantages, trained, objective.loss,
                              prox=prox, ref_logp=ref, kl_coef=batch.kl_coef, kl_tokens=kl_tokens)
    n = mask.sum().clamp(min=1)
    if objective.truncates:
        stats["outside_nucleus"] = float((mask - trained).sum() / n)
    stats["entropy"] = float((entropy * mask).sum() / n)
    gap = (batch.behav_logp - logp.detach()) * trained  # (B, T)
    stats["mismatch_kl"] = float(gap.sum() / trained.sum().clamp(min=1))
    if objective.load_balance_coef and tap.router_logits:
        if batch.prefix_len:
            raise ValueError("the load-balance loss needs whole rows: pack with share_prompt off")
        real = (torch.arange(batch.input_ids.shape[1], device=batch.lengths.device)[None, :]
                < batch.lengths[:, None]).reshape(-1)
        balance = torch.stack([load_balance_loss(lg, ex, real) for lg, ex in
                               zip(tap.balance_logits(), tap.experts, strict=True)]).mean()
        loss = loss + objective.load_balance_coef * balance
        stats["load_balance"] = float(balance.detach())
    if want_mtp:
        from models.mtp import mtp_distill_loss

        ids = batch.input_ids[:, start:]  # hidden covers positions start..T-1
        draft = mtp_distill_loss(model, ids, hidden.detach(), mask[:, start:], steps=objective.mtp_steps)
        loss = loss + objective.mtp_coef * draft
        stats["mtp_loss"] = float(draft.detach())
    return loss, stats
