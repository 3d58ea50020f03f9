"""GPU checks (marked `gpu`, skipped without CUDA): the fast decoders and the torch engine on CUDA."""

from __future__ import annotations

import pytest
import torch

from models.fast_llama import fast_decoder
from models.policy import init_policy
from models.presets import PRESETS
from rollout.torch_engine import TorchEngine
from rollout.types import Request, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fast_decoder_matches_transformers_on_cuda(preset):
    policy = init_policy(preset, seed=0)
    model = policy.model.to("cuda")
    ids = torch.randint(0, len(policy.tokenizer), (130,), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    with torch.no_grad():
        ref = model(ids[None]).logits[0].float()
    fast = fast_decoder(model)
    state = fast.new_state(2, 256)
    out = [fast.extend(state, 1, ids[:90])]
    out += [fast.decode(state, torch.tensor([1], device="cuda"), ids[t:t + 1]) for t in range(90, 130)]
    assert torch.allclose(torch.cat(out), ref, atol=1e-3)


def test_engine_logprobs_on_cuda():
    policy = init_policy("tiny-hybrid-moe", seed=0)
    policy.model.to("cuda")
    engine = TorchEngine(policy, max_batch=16, max_len=256)
    prompt = policy.tokenizer.apply_chat_template([{"role": "user", "content": "Compute 2 + 3."}],
                                                 add_generation_prompt=True, return_dict=False)
    [samples] = engine.generate([Request(prompt, SamplingParams(n=4, max_new_tokens=32))])
    s = samples[0]
    ids = torch.tensor([prompt + s.token_ids], device="cuda")
    with torch.no_grad():
        logits = policy.model(ids).logits[0, len(prompt) - 1:-1].float()
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(s.token_ids, device="cuda")[:, None])[:, 0]
    assert torch.allclose(torch.tensor(s.logprobs, device="cuda"), expected, atol=1e-3)
