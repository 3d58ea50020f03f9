"""Answer pretraining: the first copied token it scores, and a trained, saved policy."""

from __future__ import annotations

import torch

from models.policy import load_policy, write_preset
from warmstart.answer_pretrain import first_token_accuracy, run_answer_pretraining


class _Predicts(torch.nn.Module):
    """Predicts the next token of `truth` everywhere except at the positions in `wrong`."""

    def __init__(self, truth: list[int], wrong: set[int], vocab: int = 50) -> None:
        super().__init__()
        self.truth, self.wrong, self.vocab = truth, wrong, vocab

    def forward(self, ids):
        nxt = [self.truth[t + 1] if t + 1 < len(self.truth) else 0 for t in range(ids.shape[1])]
        nxt = [(token + 1) % self.vocab if t in self.wrong else token for t, token in enumerate(nxt)]
        logits = torch.full((*ids.shape, self.vocab), -30.0)
        logits[0, torch.arange(ids.shape[1]), torch.tensor(nxt)] = 30.0
        return type("Out", (), {"logits": logits})()


def test_first_token_accuracy_scores_only_each_spans_first_token():
    ids = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    mask = [0, 0, 1, 1, 0, 0, 1, 1, 1]  # two spans: tokens 2-3 and 6-8, first tokens 2 and 6
    # position t predicts token t + 1: the first tokens are predicted at positions 1 and 5
    assert first_token_accuracy(_Predicts(ids, set()), [(ids, mask)], pad=0) == 1.0
    assert first_token_accuracy(_Predicts(ids, {2, 6, 7}), [(ids, mask)], pad=0) == 1.0  # later tokens
    assert first_token_accuracy(_Predicts(ids, {1}), [(ids, mask)], pad=0) == 0.5
    assert first_token_accuracy(_Predicts(ids, {1, 5}), [(ids, mask)], pad=0) == 0.0


def test_run_answer_pretraining_trains_the_policy_in_place(tmp_path):
    write_preset("tiny-hybrid-moe-2attn", tmp_path, seed=0)
    before = {k: v.clone() for k, v in load_policy(tmp_path).model.state_dict().items()}
    result = run_answer_pretraining(tmp_path, steps=2, lr=1e-3, length=8, seed=0)
    after = load_policy(tmp_path).model.state_dict()
    assert result.seconds > 0 and 0.0 <= result.accuracy <= 1.0
    assert result.loss_start > 0 and result.loss_end > 0
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("mixer" in k for k in moved) and any("embed" in k for k in moved)
