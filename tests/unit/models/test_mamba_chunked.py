"""Our Mamba-2 full-sequence path gives transformers' values and gradients, faster."""

from __future__ import annotations

import copy
import pickle

import torch
from transformers.models.nemotron_h import modeling_nemotron_h as hf

from models.mamba_chunked import FastMamba2Mixer, chunk_scan
from models.policy import init_policy


def _inputs(b=2, T=37, h=4, p=8, g=2, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, h, p, generator=gen)
    dt = torch.rand(b, T, h, generator=gen) * 0.5 + 0.01
    A = -torch.rand(h, generator=gen) * 3 - 0.1
    B, C = torch.randn(b, T, g, n, generator=gen), torch.randn(b, T, g, n, generator=gen)
    initial = torch.randn(b, h, p, n, generator=gen)
    return [t.requires_grad_() for t in (x, dt, A, B, C, initial)]


def test_the_scan_matches_transformers_reference_in_values_and_gradients():
    # T=37 with chunk 8: a padded last chunk; 4 heads over 2 groups; a state carried in
    ours_in, ref_in = _inputs(), _inputs()
    y, final = chunk_scan(*ours_in[:5], chunk=8, initial=ours_in[5])
    y_ref, final_ref = hf.mamba2_chunk_scan(*ref_in[:5], chunk_size=8, initial_states=ref_in[5],
                                            return_final_states=True)
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(final, final_ref, atol=1e-5)
    (y.square().sum() + final.sum()).backward()
    (y_ref.square().sum() + final_ref.sum()).backward()
    for ours, ref, name in zip(ours_in, ref_in, "x dt A B C initial".split(), strict=True):
        assert torch.allclose(ours.grad, ref.grad, rtol=1e-4, atol=1e-4), name


def _both():
    ours = init_policy("tiny-hybrid-moe-2attn", seed=0).model
    reference = copy.deepcopy(ours)
    for module in reference.modules():
        if isinstance(module, FastMamba2Mixer):
            module.__class__, module.chunk_size = hf.NemotronHMamba2Mixer, reference.config.chunk_size
    return ours, reference


def test_policies_load_with_the_fast_layer_and_train_as_transformers_does():
    ours, reference = _both()
    assert sum(isinstance(m, FastMamba2Mixer) for m in ours.modules()) == 2
    ids = torch.randint(0, 500, (3, 70), generator=torch.Generator().manual_seed(2))
    for model in (ours, reference):
        model.train()
        model(ids).logits.log_softmax(-1)[..., 5].sum().backward()
    assert torch.allclose(ours(ids).logits, reference(ids).logits, atol=1e-4)
    grads = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        if param.grad is not None:
            assert torch.allclose(param.grad, grads[name].grad, rtol=1e-3, atol=1e-5), name


def test_a_continuation_from_the_cache_matches_the_whole_sequence():
    ours, reference = _both()
    ids = torch.randint(0, 500, (2, 90), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = reference(ids).logits
        prompt = ours(ids[:, :70], use_cache=True)
        tail = ours(ids[:, 70:], past_key_values=prompt.past_key_values, use_cache=True).logits
        step = ours(ids[:, :1], past_key_values=prompt.past_key_values, use_cache=True).logits  # one token
    assert torch.allclose(tail, whole[:, 70:], atol=1e-4)
    assert step.shape == (2, 1, whole.shape[-1])


def test_the_swapped_layer_pickles_and_copies():
    ours, _ = _both()
    again = pickle.loads(pickle.dumps(ours))
    assert isinstance(again.model.layers[0].mixer, FastMamba2Mixer)
    ids = torch.randint(0, 500, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours(ids).logits)
