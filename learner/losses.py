"""GRPO-family policy losses with off-policy corrections (pure tensor functions).

All per-token tensors are (B, T) over B sequences; `mask` (B, T) is 1 on tokens the policy
sampled and that are trained on (prompt, environment/tool and budget-forced tokens are 0).

    logp      log-prob of each token under the policy being trained (requires grad)
    behav     log-prob under the behaviour policy, as the engine reported it
    prox      log-prob under the proximal policy (the trainer's weights before this step),
              for AReaL's decoupled objective; without it the behaviour policy is the anchor
    adv       (B,) advantage of each sequence
    kl_coef   (B,) optional KL coefficient of each sequence (per-environment `kl_coef`);
              without it every sequence gets `LossConfig.kl_coef`

Objective per token (PPO clip, with clip-higher): -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A),
r = exp(logp - anchor). GSPO replaces r by the sequence's geometric-mean ratio. With `prox`,
the clipped term is weighted by w = exp(prox - behav) (stop-gradient, capped): AReaL's decoupled
PPO, which keeps stale data unbiased. Engine/trainer mismatch: `truncate` caps w at `is_cap`
(TIS); `mask` drops tokens whose w leaves [1/is_cap, is_cap] (MIS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.28
    aggregation: str = "token"  # token (DAPO) | sequence (GRPO)
    ratio_level: str = "token"  # token | sequence (GSPO)
    is_correction: str = "truncate"  # none | truncate | mask
    is_cap: float = 2.0
    kl_coef: float = 0.0
    kl_estimator: str = "k2"  # k2 | k3 | full: the KL term's per-token form (`kl_penalty`, `full_kl`)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T) -> scalar: mean over all masked tokens, or mean over sequences of their token mean."""
    mask = mask.to(per_token.dtype)
    if how == "token":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if how == "sequence":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
        has = (mask.sum(1) > 0).to(per_token.dtype)
        return (per_seq * has).sum() / has.sum().clamp(min=1)
    raise ValueError(f"unknown aggregation {how!r}; choose token or sequence")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(d) - d - 1 with d = ref - logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def k2_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """0.5 * (logp - ref)^2 per token; its gradient is (logp - ref) * grad(logp)."""
    return 0.5 * (logp - ref_logp) ** 2


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits, ref_logits (B, T, V) -> (B, T): the exact KL(pi || ref) of each position's whole
    next-token distribution (logits / `temperature`, no top-p/top-k truncation), aligned as
    `logprobs_from_logits` (position t holds the distribution that predicted token t; 0 at 0).

    Unlike k2 and k3, which see only the sampled token, it sees a token that every sample writes
    (probability ~1, so its advantages cancel and k2's gradient is 0) losing mass to one no sample
    has written yet: the form code's collapses took in the quick start (README, session 36)."""
    z = logits[:, :-1].float() / temperature  # (B, T-1, V)
    logp = torch.log_softmax(z, dim=-1)
    gap = logp - torch.log_softmax(ref_logits[:, :-1].float() / temperature, dim=-1)  # (B, T-1, V)
    p = logp.exp()
    kl = (p * gap).sum(-1)  # (B, T-1)
    # Its gradient in z is p (gap - kl), taken here in closed form: autograd through p * gap adds
    # p (1 - sum p), float rounding that is not 0 where pi == ref, and Adam's per-weight scaling
    # turns such a gradient into moves of a tenth of the learning rate.
    with torch.no_grad():
        direction = p * (gap - kl[..., None])
    surrogate = (direction * z).sum(-1)
    return F.pad(kl.detach() + surrogate - surrogate.detach(), (1, 0))  # (B, T)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """(B, T) KL term of the loss.

    `k2`: on tokens sampled from the policy its gradient, (logp - ref) * grad(logp), is the exact
    gradient of KL(pi || ref), and it grows linearly with the gap. `k3` as a loss has the
    gradient (1 - ref_p / pi_p) * grad(logp): the gradient of KL(ref || pi), weighted by a ratio
    with no bound. When RL has pushed a token the reference liked down to pi ~ 1e-6 and it is
    sampled all the same, that one token's weight is ~e^13: in one quick-start run the gradient
    norm reached 1,500-19,000 (median 2) at 5 of 254 steps, each a step spent on one token
    (README, "Trajectory stream, learner"). Both agree to first order where pi and ref are close."""
    if estimator == "k2":
        return k2_kl(logp, ref_logp)
    if estimator == "k3":
        return k3_kl(logp, ref_logp)
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k2 or k3")


def policy_loss(logp: torch.Tensor, behav: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                cfg: LossConfig, prox: torch.Tensor | None = None,
                ref_logp: torch.Tensor | None = None, kl_coef: torch.Tensor | None = None,
                kl_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Returns (scalar loss, statistics). `kl_tokens` (B, T): the KL term per position computed
    elsewhere (`full_kl`), used instead of `kl_estimator` on `ref_logp`."""
    mask = mask.float()
    anchor = behav if prox is None else prox
    log_ratio = logp - anchor  # (B, T)
    if cfg.ratio_level == "sequence":  # GSPO: length-normalised sequence ratio, per token
        seq = (log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
        # The value is the sequence ratio; each token carries s * grad(logp_t), which the
        # sequence mean turns into GSPO's s * grad(mean logp).
        log_ratio = seq.detach()[:, None] + logp - logp.detach()
    ratio = torch.exp(log_ratio)
    a = adv[:, None]
    clipped = torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
    per_token = -torch.minimum(ratio * a, clipped * a)  # (B, T)
    weights = torch.ones_like(per_token)
    if prox is not None or cfg.is_correction != "none":
        w = torch.exp((anchor - behav).detach())  # behaviour correction, no gradient
        if cfg.is_correction == "truncate":
            weights = w.clamp(max=cfg.is_cap)
        elif cfg.is_correction == "mask":
            keep = (w <= cfg.is_cap) & (w >= 1 / cfg.is_cap)
            weights, mask = w * keep, mask * keep
        else:
            weights = w
    per_token = per_token * weights
    if ref_logp is not None and (kl_coef is not None or cfg.kl_coef):
        coef = cfg.kl_coef if kl_coef is None else kl_coef.to(per_token.dtype)[:, None]  # scalar or (B, 1)
        kl = kl_tokens if kl_tokens is not None else kl_penalty(logp, ref_logp, cfg.kl_estimator)
        per_token = per_token + coef * kl
    loss = aggregate(per_token, mask, cfg.aggregation)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {
            "clip_fraction": float((((ratio - clipped).abs() > 1e-8).float() * mask).sum() / n),
            "ratio_mean": float((ratio * mask).sum() / n),
            "is_weight_mean": float((weights * mask).sum() / n),
            "is_weight_max": float((weights * mask).max()) if mask.any() else 0.0,
        }
        if ref_logp is not None:
            stats["kl"] = float((k3_kl(logp, ref_logp) * mask).sum() / n)  # the value: k3 is unbiased
    return loss, stats


def load_balance_loss(router_logits: torch.Tensor, experts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence-free MoE balance loss for sigmoid routers (DeepSeek-V3's form), a scalar.

    router_logits (N, E), experts (N, k) chosen ids, mask (N,) 1 on real tokens.
    L = sum_e f_e * P_e with f_e = E / (k * N) * (tokens routed to e) and P_e the mean over
    tokens of e's normalised score; 1.0 when routing is perfectly balanced.
    """
    mask = mask.to(router_logits.dtype)
    n_tokens, n_experts = mask.sum().clamp(min=1), router_logits.shape[1]
    scores = router_logits.sigmoid()
    scores = scores / scores.sum(dim=1, keepdim=True)  # (N, E)
    counts = torch.zeros_like(scores).scatter_add_(1, experts.long(), torch.ones_like(experts, dtype=scores.dtype))
    f = n_experts / (experts.shape[1] * n_tokens) * (counts * mask[:, None]).sum(0)  # (E,)
    p = (scores * mask[:, None]).sum(0) / n_tokens  # (E,)
    return (f.detach() * p).sum()
