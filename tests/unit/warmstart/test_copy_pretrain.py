"""Copy pretraining: the data it makes, the tokens its loss covers, and a trained, saved policy."""

from __future__ import annotations

import torch

from models.policy import load_policy, write_preset
from models.tokenizer import build_tokenizer
from warmstart.copy_pretrain import (
    copy_batch,
    copy_loss,
    copy_row,
    run_copy_pretraining,
    writable_ids,
)


def test_a_copy_batch_shows_random_tokens_from_the_vocabulary_twice():
    vocab = torch.arange(5, 50)
    ids = copy_batch(vocab, batch=4, length=10, gen=torch.Generator().manual_seed(0))
    assert ids.shape == (4, 20)
    assert torch.equal(ids[:, :10], ids[:, 10:])
    assert bool(torch.isin(ids, vocab).all())
    assert len(set(ids[:, :10].flatten().tolist())) > 10  # random, not one repeated token


class _Oracle(torch.nn.Module):
    """Predicts the token `length` positions back: right on the second showing, except its first token."""

    def __init__(self, vocab: int, length: int) -> None:
        super().__init__()
        self.vocab, self.length = vocab, length

    def forward(self, ids):
        nxt = torch.roll(ids, shifts=self.length - 1, dims=1)  # position t guesses ids[t + 1 - L]
        logits = torch.full((*ids.shape, self.vocab), -30.0)
        logits.scatter_(2, nxt.unsqueeze(-1), 30.0)
        return type("Out", (), {"logits": logits})()


def test_the_loss_covers_the_second_showing_after_its_unknowable_first_token():
    length = 6
    ids = copy_batch(torch.arange(3, 40), batch=3, length=length, gen=torch.Generator().manual_seed(1))
    loss, accuracy = copy_loss(_Oracle(40, length), ids, length)
    assert accuracy == 1.0 and loss.item() < 1e-6  # the oracle copies every token the loss counts
    scrambled = ids.clone()
    scrambled[:, length + 1:] = torch.roll(scrambled[:, length + 1:], 1, dims=0)
    assert copy_loss(_Oracle(40, length), scrambled, length)[1] < 0.5  # a wrong second showing is scored


def test_a_copy_row_for_sft_trains_what_copy_loss_scores():
    import random

    tok = build_tokenizer()
    vocab = writable_ids(tok)
    assert set(tok.all_special_ids).isdisjoint(vocab) and len(vocab) > 50
    ids, mask = copy_row(vocab, 10, random.Random(0))
    assert len(ids) == len(mask) == 20 and ids[:10] == ids[10:] and set(ids) <= set(vocab)
    # SFT's loss at position t predicts ids[t] from ids[:t] (`sft_loss` reads mask[1:]): the same
    # tokens as `copy_loss`, the second showing after its first token
    assert [t for t, m in enumerate(mask) if m] == list(range(11, 20))


def test_run_copy_pretraining_trains_the_policy_in_place(tmp_path):
    write_preset("tiny-hybrid-moe-2attn", tmp_path, seed=0)
    before = {k: v.clone() for k, v in load_policy(tmp_path).model.state_dict().items()}
    result = run_copy_pretraining(tmp_path, steps=6, length=8, batch=4, seed=0)
    after = load_policy(tmp_path).model.state_dict()
    assert result.seconds > 0 and 0.0 <= result.accuracy <= 1.0
    assert result.loss_start > 0 and result.loss_end > 0
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("mixer" in k for k in moved) and any("embed" in k for k in moved)
