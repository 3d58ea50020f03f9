"""MTP heads: vLLM's layout, saved beside the policy, ignored by transformers, trainable."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from models.mtp import add_mtp_heads, mtp_distill_loss, mtp_logits, mtp_loss
from models.policy import init_policy, load_policy


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    policy = init_policy("tiny-hybrid-moe", seed=0)
    add_mtp_heads(policy.model, seed=1)
    out = tmp_path_factory.mktemp("mtp") / "policy"
    policy.save(out)
    return policy, out


def test_layout_is_vllms(saved):
    _, out = saved
    with safe_open(out / "mtp.safetensors", "pt") as f:
        keys = set(f.keys())
    for key in ("mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight",
                "mtp.layers.0.norm.weight", "mtp.layers.0.mixer.q_proj.weight",
                "mtp.layers.1.mixer.experts.0.up_proj.weight", "mtp.layers.1.mixer.gate.weight",
                "mtp.layers.1.final_layernorm.weight"):
        assert key in keys, key
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    assert config["mtp_layers_block_type"] == ["full_attention", "moe"]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not any(k.startswith("mtp.") for k in f.keys())


def test_round_trip_and_plain_transformers_ignores_heads(saved, caplog):
    policy, out = saved
    ids = torch.randint(0, 700, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = policy.model.model(ids).last_hidden_state
        expected = mtp_logits(policy.model, ids, hidden)
        again = load_policy(out)
        assert torch.allclose(mtp_logits(again.model, ids, hidden), expected, atol=1e-5)
    caplog.clear()
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(plain, "mtp")
    assert "mtp" not in caplog.text.lower()
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, policy.model(ids).logits, atol=1e-5)


def test_dense_policy_gets_a_dense_head():
    policy = init_policy("tiny-hybrid-dense")
    head = add_mtp_heads(policy.model)
    assert head.kinds == ["full_attention", "mlp"]
    with pytest.raises(ValueError, match="nemotron_h"):
        add_mtp_heads(init_policy("tiny-attention").model)


def test_mtp_loss_hand_computed_and_masked():
    logits = torch.zeros(1, 3, 4)  # T=4 -> 3 MTP rows, the last predicts past the end
    logits[0, 0, 2] = 10.0  # row 0 predicts token at t=2 -> ids[2] = 2: confident and right
    ids = torch.tensor([[0, 1, 2, 3]])
    loss_row0 = torch.nn.functional.cross_entropy(logits[0, :1], torch.tensor([2]))
    uniform = torch.log(torch.tensor(4.0))
    assert mtp_loss(logits, ids).item() == pytest.approx((loss_row0.item() + uniform.item()) / 2, rel=1e-5)
    mask = torch.tensor([[0, 0, 1, 0]])  # only ids[2] counts
    assert mtp_loss(logits, ids, mask).item() == pytest.approx(loss_row0.item(), rel=1e-5)


def _policy_with_heads():
    policy = init_policy("tiny-hybrid-moe", seed=0)
    add_mtp_heads(policy.model, seed=1)
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = policy.model.model(ids).last_hidden_state
    return policy.model, ids, hidden


def test_mtp_distill_loss_is_the_kl_to_the_policys_own_next_distribution():
    model, ids, hidden = _policy_with_heads()
    mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1, 0, 0]])
    with torch.no_grad():
        draft = mtp_logits(model, ids, hidden).log_softmax(-1)  # (B, T-1, V): row t predicts t+2
        policy = model.lm_head(hidden).float().log_softmax(-1)  # (B, T, V): row t predicts t+1
        kl = (policy[:, 1:].exp() * (policy[:, 1:] - draft)).sum(-1)  # (B, T-1)
        # row t reads token t+1 and predicts t+2: both the policy's (the last row's is past the end)
        counted = (mask[:, 1:-1] * mask[:, 2:]).float()
        expected = (kl[:, :-1] * counted).sum() / counted.sum()
        assert mtp_distill_loss(model, ids, hidden, mask, steps=1).item() == pytest.approx(expected.item(), rel=1e-5)
        # the second step reads the first step's output and the token two ahead, as the engine drafts
        first = model.mtp(model.get_input_embeddings()(ids[:, 1:]), hidden[:, :-1])
        second = model.lm_head(model.mtp(model.get_input_embeddings()(ids[:, 2:]), first[:, :-1])).log_softmax(-1)
        kl2 = (policy[:, 2:].exp() * (policy[:, 2:] - second)).sum(-1)  # (B, T-2): row t predicts t+3
        counted2 = (mask[:, 1:-2] * mask[:, 2:-1] * mask[:, 3:]).float()  # tokens t+1..t+3
        expected2 = (expected + (kl2[:, :-1] * counted2).sum() / counted2.sum()) / 2
        assert mtp_distill_loss(model, ids, hidden, mask, steps=2).item() == pytest.approx(expected2.item(), rel=1e-5)


def test_mtp_distill_loss_moves_only_the_heads():
    model, ids, hidden = _policy_with_heads()
    for p in model.parameters():
        p.requires_grad_(True)  # as in the learner: a stray path into the policy would show
    mtp_distill_loss(model, ids, hidden, steps=2).backward()
    moved = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved and all(n.startswith("mtp.") for n in moved)


def test_train_mtp_refuses_an_unknown_objective(tmp_path):
    from warmstart.train_mtp import train_mtp

    with pytest.raises(ValueError, match="objective='kl'.*distill, tokens"):
        train_mtp(tmp_path, objective="kl")
    with pytest.raises(ValueError, match="unroll=0"):
        train_mtp(tmp_path, unroll=0)


def test_heads_learn_to_predict_two_ahead():
    policy = init_policy("tiny-hybrid-moe", seed=0)
    head = add_mtp_heads(policy.model)
    for p in policy.model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    ids = torch.arange(40).repeat(4, 1) % 17 + 30  # a periodic sequence: two-ahead is learnable
    with torch.no_grad():
        hidden = policy.model.model(ids).last_hidden_state
    losses = []
    for _ in range(80):
        loss = mtp_loss(mtp_logits(policy.model, ids, hidden), ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # frozen random lm_head: a clear drop, not a perfect fit


def test_train_mtp_command_fits_and_saves_heads(tmp_path, capsys):
    import re

    from estuary.cli import main

    policy_dir = tmp_path / "policy"
    init_policy("tiny-hybrid-moe", seed=0).save(policy_dir)
    assert main(["model", "train-mtp", str(policy_dir), "--samples", "16", "--steps", "30",
                 "--max-new-tokens", "24", "--env", "estuary/math"]) == 0
    start, end = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", capsys.readouterr().out).groups())
    assert end < start
    assert (policy_dir / "mtp.safetensors").is_file()
    loaded = load_policy(policy_dir)
    assert loaded.model.mtp is not None
    from rollout.torch_engine import TorchEngine
    from rollout.types import Request, SamplingParams

    engine = TorchEngine(loaded, max_batch=4, max_len=128, mtp_steps=2)
    [samples] = engine.generate([Request([1, 2, 3], SamplingParams(n=2, max_new_tokens=10))])
    assert all(len(s.token_ids) >= 1 for s in samples) and engine.stats["drafted"] > 0
