"""The torch engine: exact behaviour log-probs, continuous batching, weight swaps, budgets."""

from __future__ import annotations

import threading

import pytest
import torch

from models.policy import init_policy
from rollout.torch_engine import EngineError, TorchEngine
from rollout.types import Request, SamplingParams


@pytest.fixture(scope="module", params=["tiny-hybrid-moe", "tiny-hybrid-dense", "tiny-attention"])
def policy(request):
    return init_policy(request.param, seed=0)


def _prompt(policy, text="Compute 2 + 3."):
    return policy.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True, return_dict=False)


def _full_logprobs(policy, prompt, sample, temperature=1.0):
    ids = torch.tensor([prompt + sample.token_ids])
    with torch.no_grad():
        logits = policy.model(ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(sample.token_ids)[:, None])[:, 0]


def test_logprobs_match_a_full_forward(policy):
    engine = TorchEngine(policy, max_batch=8, max_len=256)
    prompt = _prompt(policy)
    [samples] = engine.generate([Request(prompt, SamplingParams(n=3, max_new_tokens=40, temperature=0.7))])
    assert len(samples) == 3
    for s in samples:
        assert len(s.token_ids) == len(s.logprobs) == len(s.versions) == len(s.forced)
        expected = _full_logprobs(policy, prompt, s, temperature=0.7)
        assert torch.allclose(torch.tensor(s.logprobs), expected, atol=1e-4)


def test_more_requests_than_slots_all_finish(policy):
    engine = TorchEngine(policy, max_batch=4, max_len=256)
    reqs = [Request(_prompt(policy, f"Compute {i} + 1."), SamplingParams(n=2, max_new_tokens=5 + i))
            for i in range(6)]
    out = engine.generate(reqs)
    assert [len(samples) for samples in out] == [2] * 6
    for i, samples in enumerate(out):
        assert all(s.finish_reason in ("stop", "length") and len(s.token_ids) <= 5 + i for s in samples)
    assert sorted(engine.free) == [0, 1, 2, 3]


def test_request_bigger_than_the_batch_is_refused(policy):
    engine = TorchEngine(policy, max_batch=2, max_len=64)
    with pytest.raises(EngineError, match="max_batch"):
        engine.generate([Request(_prompt(policy), SamplingParams(n=3))])


def test_weights_swap_while_serving_and_tokens_carry_versions(policy):
    engine = TorchEngine(policy, max_batch=8, max_len=512)
    new = {name: p.detach() * 1.01 for name, p in policy.model.named_parameters() if "lm_head" in name}
    original = {k: v.clone() for k, v in policy.model.state_dict().items() if k in new}
    started = threading.Event()
    real_step = engine._step

    def step(active):
        started.set()
        return real_step(active)

    engine._step = step
    swapper = threading.Thread(target=lambda: (started.wait(), engine.update_weights(new, version=7)))
    swapper.start()
    [samples] = engine.generate([Request(_prompt(policy), SamplingParams(n=2, max_new_tokens=60,
                                                                         stop_token_ids=()))])
    swapper.join()
    versions = samples[0].versions
    assert versions[0] == 0 and versions[-1] == 7 and versions == sorted(versions)
    assert engine.version == 7
    with torch.no_grad():
        for k, v in original.items():
            policy.model.state_dict()[k].copy_(v)
    with pytest.raises(EngineError, match="lacks"):
        engine.update_weights({"no.such.weight": torch.zeros(1)}, 8)


def test_continuation_reuses_state(policy):
    engine = TorchEngine(policy, max_batch=4, max_len=512)
    prompt = _prompt(policy)
    [[first]] = engine.generate([Request(prompt, SamplingParams(max_new_tokens=6, keep_state=True))])
    tool = policy.tokenizer.encode("<|im_start|>tool\n<tool_response>5</tool_response><|im_end|>\n"
                                   "<|im_start|>assistant\n", add_special_tokens=False)
    [[second]] = engine.generate([Request(tool, SamplingParams(max_new_tokens=6), parent=first.handle)])
    context = prompt + first.token_ids + tool
    expected = _full_logprobs(policy, context, second)
    assert torch.allclose(torch.tensor(second.logprobs), expected, atol=1e-4)
    assert len(engine.free) == 4  # the kept slot came back when the continuation finished


def test_requests_join_while_others_decode_and_cancel_frees_their_slots(policy):
    """Step-wise serving: a late request finishes while an earlier one still decodes (exact
    log-probs), a continuation passes a queued request that does not fit, cancel frees all."""
    engine = TorchEngine(policy, max_batch=4, max_len=256)
    long = Request(_prompt(policy), SamplingParams(n=2, max_new_tokens=40, ignore_eos=True))
    engine.submit(long)
    for _ in range(4):
        assert engine.step() == []
    late = Request(_prompt(policy, "Compute 4 + 4."), SamplingParams(max_new_tokens=5, ignore_eos=True,
                                                                      keep_state=True))
    engine.submit(late)
    [(request, [sample])] = next(out for out in iter(engine.step, None) if out)
    assert request is late and len(sample.token_ids) == 5 and engine.has_work()
    assert torch.allclose(torch.tensor(sample.logprobs), _full_logprobs(policy, late.prompt_ids, sample), atol=1e-4)
    wide = Request(_prompt(policy), SamplingParams(n=2, max_new_tokens=3))  # 1 slot free: it waits
    tool = policy.tokenizer.encode("<|im_start|>tool\n<tool_response>8</tool_response><|im_end|>\n"
                                   "<|im_start|>assistant\n", add_special_tokens=False)
    follow = Request(tool, SamplingParams(max_new_tokens=3, ignore_eos=True), parent=sample.handle)
    engine.submit(wide)
    engine.submit(follow)
    [(request, [second])] = next(out for out in iter(engine.step, None) if out)
    assert request is follow  # the continuation needed no new slot and did not queue behind `wide`
    context = late.prompt_ids + sample.token_ids + tool
    assert torch.allclose(torch.tensor(second.logprobs), _full_logprobs(policy, context, second), atol=1e-4)
    engine.cancel(long.request_id)
    engine.cancel(wide.request_id)
    assert not engine.has_work() and len(engine.free) == 4


def test_thinking_budget_is_honoured(policy):
    engine = TorchEngine(policy, max_batch=8, max_len=256)
    tok = policy.tokenizer
    think, close = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    prompt = _prompt(policy) + [think]
    [samples] = engine.generate([Request(prompt, SamplingParams(n=6, max_new_tokens=40,
                                                                thinking_budget=6, grace_tokens=2))])
    for s in samples:
        assert s.thinking_budget == 6  # a request's samples share its budget: the one its prompt states
        assert s.thinking_tokens <= s.thinking_budget + 2
        if any(s.forced):
            idx = s.forced.index(True)
            assert s.token_ids[idx] == close and s.logprobs[idx] == 0.0 and sum(s.forced) == 1
    assert any(any(s.forced) for s in samples)  # a random policy rarely closes on its own
    [plain] = engine.generate([Request(prompt, SamplingParams(n=4, max_new_tokens=30))])
    assert not any(any(s.forced) for s in plain)


def test_a_budget_range_is_refused_with_where_to_draw_it():
    with pytest.raises(ValueError, match="draw_budget"):
        SamplingParams(thinking_budget=(4, 8))


def test_routing_is_returned_for_moe_policies(policy):
    engine = TorchEngine(policy, max_batch=4, max_len=256)
    [samples] = engine.generate([Request(_prompt(policy), SamplingParams(n=2, max_new_tokens=30,
                                                                         return_routing=True))])
    s = samples[0]
    cfg = policy.model.config
    if cfg.model_type == "nemotron_h" and "moe" in cfg.layers_block_type:
        # one entry per generated token fed back through the model (all but the last)
        assert len(s.routed_experts) == len(s.token_ids) - 1
        assert len(s.routed_experts[0]) == cfg.layers_block_type.count("moe")
        assert all(len(ids) == cfg.num_experts_per_tok for ids in s.routed_experts[0])
    else:
        assert s.routed_experts is None


def test_stop_strings_end_generation(policy):
    engine = TorchEngine(policy, max_batch=4, max_len=256)
    near_greedy = SamplingParams(max_new_tokens=20, temperature=1e-3)
    [[free]] = engine.generate([Request(_prompt(policy), near_greedy)])
    pieces = [policy.tokenizer.decode([t]) for t in free.token_ids]
    k = next(i for i, p in enumerate(pieces) if p.strip() and i >= 2)
    stop = SamplingParams(max_new_tokens=20, temperature=1e-3, stop_strings=(pieces[k],))
    [[stopped]] = engine.generate([Request(_prompt(policy), stop)])
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) <= k + 1


def test_engine_factory(tiny_policy_dirs):
    from rollout.engines import make_engine

    engine = make_engine("torch", tiny_policy_dirs["tiny-hybrid-moe"], max_batch=2, max_len=64)
    assert isinstance(engine, TorchEngine)
    with pytest.raises(ValueError, match="did you mean 'vllm'"):
        make_engine("vlm", tiny_policy_dirs["tiny-hybrid-moe"])
