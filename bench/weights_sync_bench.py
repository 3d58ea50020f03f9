"""Weight sync: publish-to-served latency vs a raw in-memory copy of the same tensors.

    .venv/bin/python -m bench.weights_sync_bench

For `tiny-hybrid-moe` and a ~100M-parameter NemotronH (hybrid M-*-E pattern, hidden 768):
ours = the learner publishes its state dict over the `local` transport (shared memory), the
engine pulls the newest version straight into its own model's tensors (`pull_into`);
baseline = copying each tensor straight into the engine model's tensors in the same process.
Both sides are the best of 50 runs (tiny) or 5 (100M).

Prints a table, then `RESULT <name> ours=<s> baseline=<s> ratio=<baseline/ours>`.
"""

from __future__ import annotations

import tempfile

import torch
from transformers import AutoModelForCausalLM, NemotronHConfig

from bench.timing import best_time
from models.policy import init_policy
from weights_sync.local import SharedMemoryWeightSync


def nemotron_100m() -> torch.nn.Module:
    cfg = NemotronHConfig(
        vocab_size=32768, hidden_size=768, layers_block_type=NemotronHConfig._pattern_to_list("M-M*ME" * 2),
        num_attention_heads=12, num_key_value_heads=4, head_dim=64, intermediate_size=2048,
        mamba_num_heads=24, mamba_head_dim=64, n_groups=4, ssm_state_size=64, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=768, moe_shared_expert_intermediate_size=1536,
        moe_latent_size=384, tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(cfg)


def measure(model: torch.nn.Module) -> tuple[float, float, int]:
    source = {k: v.detach().clone() for k, v in model.state_dict().items()}
    target = dict(model.state_dict())
    n_params = sum(v.numel() for v in source.values())
    with tempfile.TemporaryDirectory() as channel, torch.no_grad():
        pub, sub = SharedMemoryWeightSync(channel), SharedMemoryWeightSync(channel)
        version = [0]

        def ours():
            version[0] += 1
            pub.publish(source, version[0])
            assert sub.pull_into(target, newer_than=version[0] - 1) == version[0]

        def raw():
            for name, t in source.items():
                target[name].copy_(t)

        repeats = 50 if n_params < 10_000_000 else 5  # sub-millisecond runs need more tries
        o, r = best_time(ours, repeats), best_time(raw, repeats)
        pub.close()
        sub.close()
    return o, r, n_params


def main() -> None:
    rows = []
    for label, model in (("tiny-hybrid-moe", init_policy("tiny-hybrid-moe").model), ("nemotron_h-100m", nemotron_100m())):
        o, r, n = measure(model)
        rows.append((label, n, o, r))
    print(f"{'model':<18} {'params':>12} {'ours ms':>9} {'raw copy ms':>12} {'ratio':>6}")
    for label, n, o, r in rows:
        print(f"{label:<18} {n:>12,} {o * 1e3:>9.3f} {r * 1e3:>12.3f} {r / o:>6.2f}")
    for label, _n, o, r in rows:
        print(f"RESULT weight_sync_latency_s_{label} ours={o:.6f} baseline={r:.6f} ratio={r / o:.2f}")


if __name__ == "__main__":
    main()
