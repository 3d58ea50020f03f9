"""Pack trajectory samples into micro-batches by a token budget (right-padded tensors).

Each sample is one row; a micro-batch holds as many rows as fit `max_tokens` counted as
rows × longest row (the padded size the forward pass pays for). Rows are sorted by length
first so that similar lengths share a micro-batch and little is spent on padding.

`pack_groups` keeps each group's rows together and marks the prompt they share
(`MicroBatch.prefix_len`): the forward pass runs it once and carries its Mamba state and KV
cache into every row (`learner.objective.forward`). A group's G samples repeat one prompt, so
rows pay for it G times: counted on the demo's warm-start groups, 3.1x the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from streams.trajectory import POLICY, Trajectory


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (B, T) right-padded
    loss_mask: torch.Tensor  # (B, T) 1 where the token is trained on (policy-sampled)
    behav_logp: torch.Tensor  # (B, T) engine log-probs
    versions: torch.Tensor  # (B, T) policy version per token (-1 elsewhere)
    advantages: torch.Tensor  # (B,)
    n_tokens: int  # trained tokens
    lengths: torch.Tensor  # (B,) real (unpadded) length of each row
    routed: torch.Tensor | None = None  # (B, T, layers, k) experts the engine used, -1 where unknown
    prox_logp: torch.Tensor | None = None  # (B, T) proximal log-probs, when the trainer recomputed them
    prefix_len: int = 0  # leading tokens every row shares (no trained token among them); 0: none
    kl_coef: torch.Tensor | None = None  # (B,) KL coefficient per row (per environment); None: the objective's

    def to(self, device: torch.device | str) -> MicroBatch:
        """This micro-batch on `device` (batches are packed in host memory; a GPU learner trains there)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return MicroBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def pack(samples: list[Trajectory], advantages: list[float], max_tokens: int, pad_id: int = 0,
         routing: bool = False, kl_coefs: list[float] | None = None) -> list[MicroBatch]:
    """samples with one advantage each -> micro-batches whose padded size fits `max_tokens`.

    `routing`: carry the samples' recorded experts (for routing replay). `kl_coefs`: one KL
    coefficient per sample (None: the objective's for all).
    """
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].token_ids))
    batches, current = [], []
    for i in order:
        longest = max([len(samples[j].token_ids) for j in current] + [len(samples[i].token_ids)])
        if current and longest * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return [_collate([samples[i] for i in rows], [advantages[i] for i in rows], pad_id, routing,
                     kl_coefs=None if kl_coefs is None else [kl_coefs[i] for i in rows])
            for rows in batches]


# A shared prefix shorter than this is not worth a forward pass of its own.
MIN_SHARED = 8


def shared_prefix(samples: list[Trajectory]) -> int:
    """Leading tokens every sample has in common before its first policy token, leaving each at
    least one token of its own (the prompt a group's samples share)."""
    first = samples[0].token_ids
    limit = min(len(s.token_ids) for s in samples) - 1
    for s in samples:
        policy = np.flatnonzero(s.loss_mask == POLICY)
        if len(policy):
            limit = min(limit, int(policy[0]))
        same = np.flatnonzero(s.token_ids[:limit] != first[:limit])
        if len(same):
            limit = int(same[0])
    return max(limit, 0)


def pack_groups(groups: list[tuple[list[Trajectory], list[float]]], max_tokens: int, pad_id: int = 0,
                share_prompt: bool = True, kl_coefs: list[float] | None = None) -> list[MicroBatch]:
    """Each group's (samples, advantages) -> micro-batches of that group's rows sharing its prompt.
    `kl_coefs`: one KL coefficient per group (None: the objective's for all).

    The budget counts the prefix once: prefix + rows × (longest row - prefix). A group whose
    rows share fewer than `MIN_SHARED` tokens, or every group when `share_prompt` is off, is
    packed as plain rows.
    """
    batches, plain, plain_adv, plain_kl = [], [], [], []
    for g, (samples, advantages) in enumerate(groups):
        kl = None if kl_coefs is None else [kl_coefs[g]] * len(samples)
        p = shared_prefix(samples) if share_prompt and len(samples) > 1 else 0
        if p < MIN_SHARED:
            plain += samples
            plain_adv += advantages
            plain_kl += kl or []
            continue
        order = sorted(range(len(samples)), key=lambda i: len(samples[i].token_ids))
        current: list[int] = []
        for i in order:
            if current and p + (len(current) + 1) * (len(samples[i].token_ids) - p) > max_tokens:
                batches.append(_collate([samples[j] for j in current], [advantages[j] for j in current],
                                        pad_id, False, prefix_len=p, kl_coefs=kl and kl[: len(current)]))
                current = []
            current.append(i)
        batches.append(_collate([samples[j] for j in current], [advantages[j] for j in current],
                                pad_id, False, prefix_len=p, kl_coefs=kl and kl[: len(current)]))
    return batches + (pack(plain, plain_adv, max_tokens, pad_id, kl_coefs=plain_kl or None) if plain else [])


def _routed(samples: list[Trajectory], width: int) -> torch.Tensor | None:
    shapes = {s.routed_experts.shape[1:] for s in samples if s.routed_experts is not None}
    if not shapes:
        return None
    if len(shapes) > 1:
        raise ValueError(f"samples disagree on the routing shape (layers, k): {sorted(shapes)}")
    (layers, k), = shapes
    out = torch.full((len(samples), width, layers, k), -1, dtype=torch.int16)
    for r, s in enumerate(samples):
        if s.routed_experts is not None:
            out[r, : len(s.token_ids)] = torch.from_numpy(s.routed_experts.astype("int16"))
    return out


def _collate(samples: list[Trajectory], advantages: list[float], pad_id: int, routing: bool,
             prefix_len: int = 0, kl_coefs: list[float] | None = None) -> MicroBatch:
    width = max(len(s.token_ids) for s in samples)
    b = len(samples)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros(b, width)
    behav = torch.zeros(b, width)
    versions = torch.full((b, width), -1, dtype=torch.long)
    for r, s in enumerate(samples):
        n = len(s.token_ids)
        ids[r, :n] = torch.from_numpy(s.token_ids.astype("int64"))
        mask[r, :n] = torch.from_numpy((s.loss_mask == POLICY).astype("float32"))
        behav[r, :n] = torch.from_numpy(s.logprobs.astype("float32"))
        versions[r, :n] = torch.from_numpy(s.versions.astype("int64"))
    lengths = torch.tensor([len(s.token_ids) for s in samples])
    return MicroBatch(ids, mask, behav, versions, torch.tensor(advantages, dtype=torch.float32),
                      int(mask.sum()), lengths, _routed(samples, width) if routing else None,
                      prefix_len=prefix_len,
                      kl_coef=None if kl_coefs is None else torch.tensor(kl_coefs, dtype=torch.float32))
