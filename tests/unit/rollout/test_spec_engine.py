"""Self-speculative decoding in the torch engine is exact: same token distributions as without."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

import rollout.torch_spec as torch_spec
from models.mtp import add_mtp_heads
from models.policy import init_policy
from rollout.sampling import processed_logprobs
from rollout.torch_engine import EngineError, TorchEngine
from rollout.types import Request, SamplingParams


@pytest.fixture(scope="module")
def peaky():
    """A tiny MoE policy whose next-token distributions put their mass on a few tokens."""
    policy = init_policy("tiny-hybrid-moe", seed=0)
    with torch.no_grad():
        policy.model.lm_head.weight.mul_(25.0)
    add_mtp_heads(policy.model, seed=3)
    prompt = policy.tokenizer.apply_chat_template([{"role": "user", "content": "Compute 1 + 1."}],
                                                 add_generation_prompt=True, return_dict=False)
    return policy, prompt


class Coin:
    """A draft governor that draws each step's depth at random, 0 to `max_depth` (a switch off
    feeds the token left for a speculative step; a switch on drafts from a plain step's hidden
    state; a switch of depth verifies a different number of drafts): every hand-over must keep
    decoding exact."""

    def __init__(self, max_depth: int = 2) -> None:
        self.rng = random.Random(0)
        self.max_depth = max_depth
        self.depths: Counter = Counter()

    def depth(self, active: int) -> int:
        d = self.rng.randint(0, self.max_depth)
        self.depths[d] += 1
        return d

    def record(self, *_) -> None:
        pass


def _generate(policy, prompt, top_p, n_total=3000, mtp_steps=2, alternate=False, draft_dtype="float32"):
    engine = TorchEngine(policy, max_batch=100, max_len=64, seed=11, mtp_steps=mtp_steps, draft_max_batch=0,
                         draft_dtype=draft_dtype)
    if alternate:
        engine.governor = Coin(mtp_steps)
    params = SamplingParams(n=100, max_new_tokens=3, top_p=top_p, ignore_eos=True)
    out = engine.generate([Request(prompt, params) for _ in range(n_total // 100)])
    return [tuple(s.token_ids) for samples in out for s in samples], engine


def _exact(policy, context, top_p):
    with torch.no_grad():
        logits = policy.model(torch.tensor([context])).logits[0, -1:]
    return processed_logprobs(logits, torch.ones(1), torch.zeros(1, dtype=torch.long),
                              torch.tensor([top_p]))[0].exp()


def _pvalue(counts: Counter, probs: torch.Tensor) -> float:
    total = sum(counts.values())
    order = probs.argsort(descending=True).tolist()
    bins = [t for t in order if probs[t] * total >= 5]
    observed = [counts.get(t, 0) for t in bins] + [total - sum(counts.get(t, 0) for t in bins)]
    expected = [float(probs[t]) * total for t in bins]
    expected.append(total - sum(expected))
    if expected[-1] < 1e-9:  # no mass outside the bins
        observed, expected = observed[:-1], expected[:-1]
    scale = sum(observed) / sum(expected)
    return chisquare(observed, [e * scale for e in expected]).pvalue


@pytest.mark.parametrize(("top_p", "alternate", "draft_dtype"),
                         [(1.0, False, "float32"), (0.8, False, "float32"), (1.0, True, "float32"),
                          (1.0, False, "int8")])
def test_draft_positions_follow_the_target(peaky, top_p, alternate, draft_dtype):
    policy, prompt = peaky
    samples, engine = _generate(policy, prompt, top_p, alternate=alternate, draft_dtype=draft_dtype)
    assert (engine.draft_head is not None) == (draft_dtype == "int8")
    if alternate:  # plain steps, one draft and two, in every order
        assert set(engine.governor.depths) == {0, 1, 2}
        assert engine.stats["steps_k1"] > 0 and engine.stats["steps_k2"] > 0  # verifications at each depth
    assert engine.stats["drafted"] > 0 and engine.stats["accepted"] < engine.stats["drafted"]
    if top_p == 1.0:  # both paths exercised: accepted drafts and residual resamples
        assert engine.stats["accepted"] > 0
    first = Counter(s[0] for s in samples).most_common(1)[0][0]
    second = Counter(s[1] for s in samples if s[0] == first)
    assert _pvalue(second, _exact(policy, prompt + [first], top_p)) > 1e-3
    pair = Counter(s[:2] for s in samples).most_common(1)[0][0]
    third = Counter(s[2] for s in samples if s[:2] == pair)
    assert _pvalue(third, _exact(policy, prompt + list(pair), top_p)) > 1e-3


def test_a_biased_acceptance_rule_is_detected(peaky, monkeypatch):
    policy, prompt = peaky

    def accept_everything(target, draft_lp, drafts, gen):
        b, k = drafts.shape
        tokens = torch.cat([drafts, target[:, -1].exp().multinomial(1, generator=gen)], 1)
        return torch.full((b,), k), tokens, target.gather(2, tokens[..., None])[..., 0]

    monkeypatch.setattr(torch_spec, "speculative_accept", accept_everything)
    samples, _ = _generate(policy, prompt, 1.0)
    first = Counter(s[0] for s in samples).most_common(1)[0][0]
    second = Counter(s[1] for s in samples if s[0] == first)
    assert _pvalue(second, _exact(policy, prompt + [first], 1.0)) < 1e-3


@pytest.mark.parametrize(("alternate", "draft_dtype"), [(False, "float32"), (True, "float32"), (False, "int8")])
def test_speculative_logprobs_are_the_targets(peaky, alternate, draft_dtype):
    policy, prompt = peaky
    engine = TorchEngine(policy, max_batch=8, max_len=128, mtp_steps=3, draft_max_batch=0, draft_dtype=draft_dtype)
    if alternate:
        engine.governor = Coin(3)
    [samples] = engine.generate([Request(prompt, SamplingParams(n=4, max_new_tokens=30))])
    for s in samples:
        with torch.no_grad():
            logits = policy.model(torch.tensor([prompt + s.token_ids])).logits[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(s.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(s.logprobs), expected, atol=1e-4)


def test_drafting_needs_heads():
    with pytest.raises(EngineError, match="MTP heads"):
        TorchEngine(init_policy("tiny-hybrid-moe"), mtp_steps=2)


def test_new_weights_rebuild_the_int8_draft_copies(peaky):
    policy, prompt = peaky
    engine = TorchEngine(policy, max_batch=4, max_len=64, mtp_steps=2, draft_max_batch=0, draft_dtype="int8")
    params = SamplingParams(n=2, max_new_tokens=4, ignore_eos=True)
    engine.generate([Request(prompt, params)])
    built = engine.draft_head._packs
    assert built is not None
    name = "mtp.layers.0.eh_proj.weight"
    engine.update_weights({name: policy.model.get_parameter(name).detach().clone()}, version=1)
    engine.generate([Request(prompt, params)])
    assert engine.version == 1 and engine.draft_head._packs is not built


def test_an_unknown_draft_dtype_is_refused(peaky):
    with pytest.raises(EngineError, match="draft_dtype"):
        TorchEngine(peaky[0], mtp_steps=2, draft_dtype="int4")


class Recorder(Coin):
    """Plain steps only, recording what the engine says each one cost."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def depth(self, active: int) -> int:
        return 0

    def record(self, active, depth, seconds, tokens) -> None:
        self.seconds.append(seconds)


def test_draft_governor_is_told_a_cpu_steps_compute_not_its_waits(peaky):
    """On a CPU a step's cost is the engine thread's own CPU time: waiting (for the GIL while
    environment threads judge, for a learner sharing the cores) must not make plain steps look dear."""
    policy, prompt = peaky
    engine = TorchEngine(policy, max_batch=4, max_len=64, seed=1, mtp_steps=2)
    engine.governor = Recorder()
    decode = engine.decoder.decode

    def waits_then_decodes(*a, **k):
        time.sleep(0.05)  # a wait, not compute
        return decode(*a, **k)

    engine.decoder.decode = waits_then_decodes
    engine.generate([Request(prompt, SamplingParams(n=2, max_new_tokens=6, ignore_eos=True))])
    assert len(engine.governor.seconds) >= 3 and max(engine.governor.seconds) < 0.04


class Deep(Recorder):
    """Two drafts every step, recording how many tokens each measured step emitted."""

    def depth(self, active: int) -> int:
        return 2

    def record(self, active, depth, seconds, tokens) -> None:
        self.seconds.append(tokens)


def test_steps_without_a_forward_pass_are_not_measured(peaky):
    """A request's first step under drafting samples from the prefill's logits and runs nothing
    (its forward comes with the next step's verification), and a plain step whose sequences all
    finish feeds nothing: told to the governor, such a step makes its depth look nearly free."""
    policy, prompt = peaky
    engine = TorchEngine(policy, max_batch=4, max_len=64, seed=1, mtp_steps=2)
    engine.governor = Deep()
    for _ in range(3):
        engine.generate([Request(prompt, SamplingParams(n=1, max_new_tokens=8, ignore_eos=True))])
    assert len(engine.governor.seconds) == engine.stats["steps_k2"] > 0  # the verifications, no more
    engine.governor = Recorder()  # plain steps of one new token each: sampled from the prefill, fed never
    for _ in range(3):
        engine.generate([Request(prompt, SamplingParams(n=2, max_new_tokens=1, ignore_eos=True))])
    assert engine.governor.seconds == []


def test_hidden_rows_are_taken_from_their_own_pass():
    """A plain step leaves each sequence (its pass's hidden states, its row); a drafting step takes
    the rows it needs: by one index_select where they share a pass, one by one where they do not."""
    a, b = torch.arange(12.0).reshape(3, 4), -torch.arange(8.0).reshape(2, 4)
    assert torch.equal(torch_spec.hidden_rows([(a, 2), (a, 0)]), torch.stack([a[2], a[0]]))
    assert torch.equal(torch_spec.hidden_rows([(a, 1), (b, 1), (a, 2)]), torch.stack([a[1], b[1], a[2]]))
