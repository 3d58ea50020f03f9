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
- `kl_coef` * k3 KL to a frozen reference model;
- `load_balance_coef` * the MoE balance loss over the trunk's routers, on router logits
  recomputed from detached inputs (`RouterTap.balance_logits`): it moves the routers only;
- `mtp_coef` * the MTP heads' cross-entropy on policy tokens. The policy's hidden states are
  detached for it and its embeddings and `lm_head` are used as constants (`models.mtp.mtp_logits`):
  the heads follow the policy, and the policy gradient stays the RL objective's.

With `routing_replay`, the forward pass uses the experts the engine recorded (`batch.routed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from learner.batching import MicroBatch
from learner.losses import LossConfig, load_balance_loss, policy_loss
from models.routing import RouterTap
from rollout.sampling import processed_logprobs


@dataclass(frozen=True)
class Objective:
    loss: LossConfig = field(default_factory=LossConfig)
    decoupled: bool = True
    load_balance_coef: float = 0.0
    mtp_coef: float = 0.0
    routing_replay: bool = False
    temperature: float = 1.0
    """The sampler's temperature (`rollout.sampling.temperature`); log-probs are of logits / it."""
    top_p: float = 1.0
    """The sampler's nucleus mass (`rollout.sampling.top_p`; 1.0: no truncation)."""
    top_k: int = 0
    """The sampler's top-k (`rollout.sampling.top_k`; 0: no truncation)."""

    @property
    def truncates(self) -> bool:
        return self.top_p < 1.0 or self.top_k > 0


def logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0,
                         top_p: float = 1.0, top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), ids (B, T) -> (log-prob of each token given its prefix, entropy), both (B, T).

    Under the sampler's processing (`rollout.sampling.processed_logprobs`): temperature, then
    top-k and top-p; a token outside the kept set gets -inf. Position 0 has no prefix: 0.
    """
    scores = logits[:, :-1]  # (B, T-1, V) predicts tokens 1..T-1
    if temperature == 1.0 and top_p >= 1.0 and top_k <= 0:
        logp_all = torch.log_softmax(scores.float(), dim=-1)
    else:
        (b, t, v), dev = scores.shape, logits.device
        n = b * t  # one row per position, each with the sampler's settings
        logp_all = processed_logprobs(scores.reshape(n, v), torch.full((n,), temperature, device=dev),
                                      torch.full((n,), top_k, device=dev), torch.full((n,), top_p, device=dev))
        logp_all = logp_all.view(b, t, v)
    logp = logp_all.gather(2, input_ids[:, 1:, None])[..., 0]
    with torch.no_grad():
        p = logp_all.exp()
        entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)  # truncated tokens add 0, not 0 * -inf
    zero = torch.zeros_like(logp[:, :1])
    return torch.cat([zero, logp], dim=1), torch.cat([zero, entropy], dim=1)


def _replay(batch: MicroBatch) -> list[torch.Tensor] | None:
    if batch.routed is None:
        return None
    b, t, layers, k = batch.routed.shape
    flat = batch.routed.reshape(b * t, layers, k).long()
    return [flat[:, layer] for layer in range(layers)]


def forward(module, model, batch: MicroBatch, objective: Objective, hidden: bool = False):
    """Run the policy on a micro-batch: (logits (B, T, V), final normed hidden (B, T, D) or None, RouterTap)."""
    replay = _replay(batch) if objective.routing_replay else None
    captured = []
    # The trunk's output (after its final norm) is what the MTP head reads; a hook takes it from
    # the one forward pass instead of asking transformers for every layer's hidden states.
    handle = model.model.register_forward_hook(lambda _m, _i, o: captured.append(o.last_hidden_state)) \
        if hidden else None
    try:
        with RouterTap(model, replay=replay) as tap:
            logits = module(batch.input_ids).logits
    finally:
        if handle is not None:
            handle.remove()
    return logits, (captured[-1] if captured else None), tap


@torch.no_grad()
def reference_logprobs(model, batch: MicroBatch, objective: Objective) -> torch.Tensor:
    """(B, T) log-probs under `model` without gradients (the proximal or reference policy)."""
    logits, _, _ = forward(model, model, batch, objective)
    return sampled_logprobs(logits, batch, objective)[0]


def sampled_logprobs(logits: torch.Tensor, batch: MicroBatch, objective: Objective
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprobs_from_logits` under the objective's sampler settings: (log-probs, entropy), (B, T)."""
    return logprobs_from_logits(logits, batch.input_ids, objective.temperature, objective.top_p, objective.top_k)


def _within_nucleus(mask: torch.Tensor, *logps: torch.Tensor | None):
    """mask (B, T) without tokens whose log-prob is -inf in any of `logps`, and the `logps` with
    those -inf replaced by 0 (so that masked sums stay finite: 0 * -inf is NaN)."""
    ok = torch.ones_like(mask, dtype=torch.bool)
    for lp in logps:
        if lp is not None:
            ok &= torch.isfinite(lp)
    return mask * ok, [None if lp is None else lp.masked_fill(~ok, 0.0) for lp in logps]


def microbatch_loss(module, model, batch: MicroBatch, objective: Objective, ref_model=None
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    want_mtp = objective.mtp_coef > 0 and getattr(model, "mtp", None) is not None
    logits, hidden, tap = forward(module, model, batch, objective, hidden=want_mtp)
    logp, entropy = sampled_logprobs(logits, batch, objective)
    prox = None
    if objective.decoupled:
        prox = batch.prox_logp if batch.prox_logp is not None else logp.detach()
    ref = reference_logprobs(ref_model, batch, objective) if ref_model is not None else None
    mask, trained = batch.loss_mask, batch.loss_mask
    if objective.truncates:
        trained, (logp, prox, ref) = _within_nucleus(mask, logp, prox, ref)
    loss, stats = policy_loss(logp, batch.behav_logp, batch.advantages, trained, objective.loss,
                              prox=prox, ref_logp=ref)
    n = mask.sum().clamp(min=1)
    if objective.truncates:
        stats["outside_nucleus"] = float((mask - trained).sum() / n)
    stats["entropy"] = float((entropy * mask).sum() / n)
    gap = (batch.behav_logp - logp.detach()) * trained  # (B, T)
    stats["mismatch_kl"] = float(gap.sum() / trained.sum().clamp(min=1))
    if objective.load_balance_coef and tap.router_logits:
        real = (torch.arange(batch.input_ids.shape[1], device=batch.lengths.device)[None, :]
                < batch.lengths[:, None]).reshape(-1)
        balance = torch.stack([load_balance_loss(lg, ex, real) for lg, ex in
                               zip(tap.balance_logits(), tap.experts, strict=True)]).mean()
        loss = loss + objective.load_balance_coef * balance
        stats["load_balance"] = float(balance.detach())
    if want_mtp:
        from models.mtp import mtp_logits, mtp_loss

        draft = mtp_loss(mtp_logits(model, batch.input_ids, hidden.detach()), batch.input_ids, mask)
        loss = loss + objective.mtp_coef * draft
        stats["mtp_loss"] = float(draft.detach())
    return loss, stats
