"""`estuary plan`: the memory arithmetic by hand, the Nano preset's placement, and refused plans."""

from __future__ import annotations

import pytest

from configs import load_config
from configs.errors import ConfigError
from configs.schema import LearnerConfig, RolloutConfig
from estuary.architecture import NEMOTRON3_NANO, Architecture, from_config_dict
from estuary.plan import GIB, engine_role, learner_role, plan_run

# A made-up hybrid: 1e9 parameters, 2 Mamba + 2 attention layers, hidden 1000, vocab 1000.
ARCH = Architecture("toy", params=10**9, hidden=1000, vocab=1000, layers={"mamba": 2, "attention": 2},
                    kv_heads=2, head_dim=100, mamba_heads=10, mamba_head_dim=10, ssm_state=10,
                    mamba_groups=1, conv_kernel=4, largest_layer=10**8)


def _terms(role) -> dict[str, float]:
    return {t.what: t.bytes for t in role.terms}


def test_a_zero3_learner_shards_weights_gradients_and_optimizer_state_over_its_ranks():
    cfg = LearnerConfig(num_learners=4, zero_stage=3, gpus_per_learner=1, micro_batch_tokens=100)
    terms = _terms(learner_role(ARCH, cfg, "bfloat16", max_seq=50, gpu_bytes=80 * GIB))
    assert terms["weights"] == 1e9 * 2 / 4  # bf16
    assert terms["gradients"] == 1e9 * 2 / 4
    assert terms["optimizer state"] == 1e9 * 12 / 4  # fp32 master + Adam m, v
    assert terms["ZeRO-3 gathered"] == 2 * 10**8 * 2  # largest layer and the prefetched next
    assert terms["activations"] == 4 * 100 * 1000 * 34  # layers x tokens x hidden x 34 B
    assert terms["logits"] == 100 * 1000 * (2 + 8)


def test_zero_stages_shard_what_they_should_and_checkpointing_keeps_only_layer_inputs():
    z1 = _terms(learner_role(ARCH, LearnerConfig(num_learners=4, zero_stage=1, micro_batch_tokens=100,
                                                 activation_checkpointing=True), "float32", 300, 0))
    assert z1["weights"] == 4e9 and z1["gradients"] == 4e9 and z1["optimizer state"] == 8e9 / 4  # fp32 on CPU
    assert "ZeRO-3 gathered" not in z1
    tokens = 300  # a sequence longer than the micro-batch budget is never split
    assert z1["activations"] == 4 * tokens * 1000 * 4 + tokens * 1000 * 34 * 2


def test_engine_cache_arithmetic_splits_by_tensor_parallelism():
    r = RolloutConfig(engine="vllm", gpus_per_worker=2, max_concurrent_episodes=8, max_len=1000,
                      vllm_kwargs={"tensor_parallel_size": 2, "gpu_memory_utilization": 0.5,
                                   "mamba_ssm_cache_dtype": "float32"})
    role = engine_role(ARCH, r, "bfloat16", gpu_bytes=80 * GIB)
    terms = _terms(role)
    assert terms["weights"] == 1e9 * 2 / 2
    # K and V, 2 attention layers, 2 KV heads / TP 2 = 1 per GPU, head_dim 100, 2 B
    assert role.kv_token == 2 * 2 * 1 * 100 * 2
    d_inner, conv_dim = 100, 100 + 2 * 1 * 10
    per_seq = 2 * -(-(d_inner * 10 * 4 + conv_dim * 3 * 2) // 2)
    assert terms["Mamba state"] == 8 * per_seq
    assert terms["KV cache"] == 8 * 1000 * role.kv_token  # all of it fits in 40 GiB
    assert role.budget == 40 * GIB


def test_the_nano_preset_plans_from_its_known_config():
    assert from_config_dict("nano", NEMOTRON3_NANO).params == 31_577_937_344  # a meta-device count
    plan = plan_run(load_config("nemotron3_nano_gpu", []))
    learner, engine = plan.roles
    assert (plan.nodes, plan.gpus) == (32, 256)
    assert learner.processes == 128 and "ZeRO-3" in learner.layout and learner.total <= learner.budget
    assert "tensor parallel 4" in engine.layout and engine.total <= engine.budget
    rendered = plan.render()
    assert "31.6B parameters" in rendered and "/ 128 ranks (ZeRO-3)" in rendered
    # log-probs 4096 positions at a time: the logits of one 49k-token sequence stop ruling out 80 GB GPUs
    learner80 = plan_run(load_config("nemotron3_nano_gpu", ["cluster.gpu_memory_gb=80"])).roles[0]
    assert learner80.total <= learner80.budget == 80 * GIB


@pytest.mark.parametrize(("overrides", "message"), [
    (["learner.logprob_chunk=0", "cluster.gpu_memory_gb=80"], "largest term is logits .*set learner.logprob_chunk"),
    (["learner.activation_checkpointing=false"], "set learner.activation_checkpointing=true"),
    (["learner.num_learners=4", "learner.zero_stage=2"], "largest term is"),
    (["rollout.gpus_per_worker=2"], "tensor_parallel_size=4 needs rollout.gpus_per_worker=4"),
    (["rollout.vllm_kwargs.gpu_memory_utilization=0.1"], "a rollout engine does not fit"),
])
def test_a_plan_that_cannot_fit_is_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_run(load_config("nemotron3_nano_gpu", overrides))


def test_estuary_plan_prints_the_tiny_plan(capsys):
    from estuary.cli import main

    assert main(["plan", "tiny_cpu", "learner.num_learners=2", "learner.zero_stage=3"]) in (0, 2)
    out = capsys.readouterr().out
    assert "learner rank x2: deepspeed ZeRO-3 across 2 rank(s)" in out and "rollout engine x1: torch" in out


def test_several_learners_need_deepspeed():
    from estuary.run_setup import check_run_config

    check_run_config(load_config("tiny_cpu", ["learner.num_learners=2"]))  # no longer refused
    with pytest.raises(ConfigError, match="needs learner.backend=deepspeed"):
        check_run_config(load_config("tiny_cpu", ["learner.num_learners=2", "learner.backend=torch"]))


def test_a_kl_reference_is_planned_sharded_under_zero3_and_whole_otherwise():
    base = ["learner.kl_coef=0.05"]
    sharded = _terms(plan_run(load_config("nemotron3_nano_gpu", base)).roles[0])
    assert sharded["reference"] == sharded["weights"]  # 1/128 of the weights each
    whole = _terms(learner_role(ARCH, LearnerConfig(kl_coef=0.05, zero_stage=2, num_learners=4), "float32",
                                max_seq=50, gpu_bytes=80 * GIB))
    assert whole["reference"] == whole["weights"] == ARCH.params * 4  # fp32 on CPU, not sharded


def test_a_weight_average_is_planned_in_host_memory():
    cpu = learner_role(ARCH, LearnerConfig(ema_decay=0.9), "float32", max_seq=50, gpu_bytes=80 * GIB)
    assert _terms(cpu)["weight average"] == ARCH.params * 4  # fp32, whole, on rank 0
    gpu = learner_role(ARCH, LearnerConfig(ema_decay=0.9, gpus_per_learner=1), "bfloat16", max_seq=50,
                       gpu_bytes=80 * GIB)
    assert "weight average" not in _terms(gpu)  # not the GPU's memory: a note says what it costs the host
    assert any("ema_decay" in note and "3.73 GiB" in note for note in gpu.notes)
