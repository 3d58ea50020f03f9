"""Tiny presets build offline, save as HF directories, and load back in plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.policy import PolicyError, init_policy, load_policy
from models.presets import TINY
from models.tokenizer import MARKUP_TOKENS


@pytest.mark.parametrize("preset", sorted(TINY))
def test_saved_policy_loads_in_transformers_with_same_logits(preset, tiny_policy_dirs):
    ours = init_policy(preset, seed=0)
    theirs = AutoModelForCausalLM.from_pretrained(tiny_policy_dirs[preset], dtype=torch.float32)
    ids = torch.randint(0, len(ours.tokenizer), (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours.model(ids).logits
        b = theirs(ids).logits
    assert a.shape == (2, 37, ours.model.config.vocab_size)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", sorted(TINY))
def test_load_policy_round_trip(preset, tiny_policy_dirs, tmp_path):
    policy = load_policy(tiny_policy_dirs[preset])
    policy.save(tmp_path / "again")
    again = load_policy(tmp_path / "again")
    ours, theirs = policy.model.state_dict(), again.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    assert again.tokenizer.get_vocab() == policy.tokenizer.get_vocab()


def test_seeded_init_is_reproducible_and_seed_sensitive():
    a = init_policy("tiny-hybrid-dense", seed=3).model.state_dict()
    b = init_policy("tiny-hybrid-dense", seed=3).model.state_dict()
    c = init_policy("tiny-hybrid-dense", seed=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_hybrid_moe_is_nemotron_h_with_latent_moe(tiny_policy_dirs):
    cfg = json.loads((tiny_policy_dirs["tiny-hybrid-moe"] / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_h"
    kinds = set(cfg["layers_block_type"])
    assert kinds == {"linear_attention", "moe", "full_attention"}  # M, E, *
    assert cfg["moe_latent_size"] < cfg["hidden_size"]
    model = load_policy(tiny_policy_dirs["tiny-hybrid-moe"]).model
    names = dict(model.named_parameters())
    # Sigmoid router with correction bias; routed experts in the latent dimension.
    assert any(n.endswith("gate.e_score_correction_bias") for n in names) or any(
        n.endswith("gate.e_score_correction_bias") for n, _ in model.named_buffers()
    )
    assert any("fc1_latent_proj" in n for n in names)


def test_dense_and_attention_presets_match_in_size(tiny_policy_dirs):
    dense = json.loads((tiny_policy_dirs["tiny-hybrid-dense"] / "config.json").read_text())
    assert set(dense["layers_block_type"]) == {"linear_attention", "mlp", "full_attention"}
    attn = json.loads((tiny_policy_dirs["tiny-attention"] / "config.json").read_text())
    assert attn["model_type"] == "qwen2"
    n_dense = sum(p.numel() for p in init_policy("tiny-hybrid-dense").model.parameters())
    n_attn = sum(p.numel() for p in init_policy("tiny-attention").model.parameters())
    assert abs(n_dense - n_attn) / n_dense < 0.01


def test_tokenizer_has_single_id_markup_and_chat_template(tiny_policy_dirs):
    tok = AutoTokenizer.from_pretrained(tiny_policy_dirs["tiny-hybrid-moe"])
    for token in MARKUP_TOKENS:
        ids = tok.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and tok.decode(ids) == token
    text = "<think>12 + 7 = 19</think> The answer is \\boxed{19}."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # Digits are one token each, so arithmetic stays learnable by a tiny model.
    assert len(tok.encode("12345", add_special_tokens=False)) == 5
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_dict=False)
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(PolicyError, match="estuary model init"):
        load_policy(tmp_path / "missing")
    with pytest.raises(PolicyError, match="tiny-hybrid-moe"):
        init_policy("tiny-mamba")
