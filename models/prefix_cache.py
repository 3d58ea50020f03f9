"""One prompt's transformers cache handed to many rows, with gradients (the learner's shared prompt).

    out = model(prefix_ids, use_cache=True)                  # (1, P): the prompt, once
    cache = branch_cache(out.past_key_values, rows=B)       # its state, B times
    tail = model(suffix_ids, past_key_values=cache)          # (B, S): each row from the prompt's state

The rows' log-probs and gradients equal a forward pass over the B full rows (tested to 1e-6):
the prompt's Mamba conv/SSM states and KV cache are repeated along the batch, and backward
sums the rows' gradients into the prompt's one pass.

Why the layers are patched: transformers' Mamba cache updates its conv and SSM states in place
(`copy_` into buffers kept at a static address for CUDA graphs). After the prefix's state has
fed the rows' scan, an in-place write over it would break autograd ("modified by an inplace
operation"). A branch cache is only read and extended once, so its Mamba layers return the new
states without storing them in place; the KV layers grow by concatenation, which is safe.
"""

from __future__ import annotations

import torch


def _no_store(states: torch.Tensor, state_idx: int = 0, **_: object) -> torch.Tensor:
    return states


def branch_cache(cache, rows: int):
    """`cache` (batch 1, from a forward pass with `use_cache=True`) made a `rows`-row cache, in place.

    Works on transformers' `DynamicCache` layers: key/value layers (attention) and linear-attention
    layers (Mamba conv and recurrent states), as NemotronH and Llama-style models build them.
    """
    for layer in cache.layers:
        if hasattr(layer, "recurrent_states"):
            for i, ready in layer.is_conv_states_initialized.items():
                if ready:
                    layer.conv_states[i] = layer.conv_states[i].repeat_interleave(rows, dim=0)
            for i, ready in layer.is_recurrent_states_initialized.items():
                if ready:
                    layer.recurrent_states[i] = layer.recurrent_states[i].repeat_interleave(rows, dim=0)
            layer.record_past = True  # the conv state is then assigned, not copied into
            layer.update_recurrent_state = _no_store
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel():
            layer.keys = keys.repeat_interleave(rows, dim=0)
            layer.values = layer.values.repeat_interleave(rows, dim=0)
    return cache
