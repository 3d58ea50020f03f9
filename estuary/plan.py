"""`estuary plan CONFIG [key=value ...]` (or `estuary train CONFIG --dry-run`): placement and memory.

    estuary plan configs/nemotron3_nano_gpu.yaml
    estuary plan tiny_cpu learner.num_learners=2

Validates the config and prints where everything goes (nodes, GPUs per role, learner ranks and
ZeRO stage, engines and tensor-parallel size) and an estimate of memory per GPU, term by term
with its arithmetic: weights, gradients and optimizer state (sharded by the ZeRO stage),
activations, the MoE layer ZeRO-3 gathers, and the engines' KV and Mamba caches. A plan that
cannot fit is refused with the key to change. The estimates are rules of thumb, stated where
they are used; they are meant to catch a plan off by a factor, not to budget the last GiB.
`estuary train` runs the same plan before it starts anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from configs.errors import ConfigError
from configs.schema import Config, LearnerConfig, RolloutConfig
from estuary.architecture import Architecture, architecture_of

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ACT_BYTES_PER_HIDDEN = 34  # saved activations per token, hidden unit and layer in 16-bit (Korthikanti et al. 2022)
ENGINE_OVERHEAD = 1 * GIB  # vLLM's own buffers beside weights and cache (CUDA graphs, sampler)


@dataclass
class Term:
    what: str
    bytes: float
    how: str  # the arithmetic, for a person to check


@dataclass
class Role:
    name: str
    processes: int
    gpus_each: float
    cpus_each: float
    layout: str  # e.g. "ZeRO-3 across 128 ranks"
    terms: list[Term] = field(default_factory=list)
    budget: float | None = None  # bytes one GPU may hold for this role; None on CPU
    kv_token: int = 0  # engines: KV-cache bytes per token on one GPU
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.terms)


@dataclass
class Plan:
    arch: Architecture
    roles: list[Role]
    nodes: int
    gpus: int

    def render(self) -> str:
        a = self.arch
        kinds = ", ".join(f"{n} {k}" for k, n in a.layers.items())
        lines = [f"model: {a.name}: {a.params / 1e9:.3g}B parameters; {a.n_layers} layers ({kinds}); "
                 f"hidden {a.hidden}, vocab {a.vocab}",
                 f"placement: {self.nodes} node(s), {self.gpus} GPU(s)"]
        for role in self.roles:
            where = f"{role.gpus_each:g} GPU + {role.cpus_each:g} CPU each" if role.gpus_each else \
                f"{role.cpus_each:g} CPU each (no GPU: memory is host RAM)"
            lines.append(f"\n{role.name} x{role.processes}: {role.layout}; {where}")
            for t in role.terms:
                lines.append(f"  {t.what:<22} {t.bytes / GIB:9.2f} GiB   {t.how}")
            budget = f" of {role.budget / GIB:.1f} GiB" if role.budget is not None else ""
            lines.append(f"  {'total':<22} {role.total / GIB:9.2f} GiB{budget}")
            lines += [f"  note: {n}" for n in role.notes]
        return "\n".join(lines)


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def learner_role(arch: Architecture, cfg: LearnerConfig, dtype: str, max_seq: int, gpu_bytes: float,
                 reference: bool | None = None) -> Role:
    """One learner rank's memory: DeepSpeed mixed precision on GPU (bf16 weights and gradients,
    fp32 master weights and Adam moments), the model's dtype on CPU."""
    on_gpu = cfg.gpus_per_learner > 0
    n, z, p = cfg.num_learners, cfg.zero_stage, arch.params
    bw = 2 if on_gpu else DTYPE_BYTES[dtype]
    opt = 12 if bw == 2 else 8  # fp32 master + Adam m, v; or Adam m, v beside fp32 weights
    shard = {k: (n if z >= k else 1) for k in (1, 2, 3)}
    terms = [
        Term("weights", p * bw / shard[3], f"{p:.4g} params x {bw} B" + (f" / {n} ranks (ZeRO-3)" if z >= 3 else "")),
        Term("gradients", p * bw / shard[2], f"{p:.4g} x {bw} B" + (f" / {n} ranks (ZeRO-{z})" if z >= 2 else "")),
        Term("optimizer state", p * opt / shard[1],
             f"{p:.4g} x {opt} B" + (f" / {n} ranks (ZeRO-{z})" if z >= 1 else "")),
    ]
    if reference is None:  # `reference`: some environment's kl_coef keeps one though the learner's is 0
        reference = cfg.kl_coef > 0
    if reference:  # the frozen reference: sharded like the weights under ZeRO-3, else whole
        terms.append(Term("reference", p * bw / shard[3], f"{p:.4g} params x {bw} B (a kl_coef > 0)"
                          + (f" / {n} ranks (ZeRO-3)" if z >= 3 else "")))
    if z == 3:
        biggest = max(arch.largest_layer, arch.vocab * arch.hidden)
        terms.append(Term("ZeRO-3 gathered", 2 * biggest * bw,
                          f"2 x {biggest:.4g} params (largest layer or embedding, and the prefetched next) x {bw} B"))
    tokens = max(cfg.micro_batch_tokens, max_seq)  # one sequence is never split across micro-batches
    layer = tokens * arch.hidden * ACT_BYTES_PER_HIDDEN * bw / 2
    if cfg.activation_checkpointing:
        saved = arch.n_layers * tokens * arch.hidden * bw
        terms.append(Term("activations", saved + layer, f"{arch.n_layers} layer inputs x {tokens} tokens x "
                          f"{arch.hidden} x {bw} B + one layer recomputed ({_gib(layer)})"))
    else:
        terms.append(Term("activations", arch.n_layers * layer, f"{arch.n_layers} layers x {tokens} tokens x "
                          f"{arch.hidden} x {ACT_BYTES_PER_HIDDEN * bw // 2} B"))
    at_once = min(tokens, cfg.logprob_chunk) if cfg.logprob_chunk else tokens
    chunked = f" (learner.logprob_chunk; of {tokens})" if at_once < tokens else ""
    terms.append(Term("logits", at_once * arch.vocab * (bw + 8), f"{at_once} tokens{chunked} x {arch.vocab} vocab x "
                      f"({bw} B logits + 4 B fp32 copy + 4 B log-softmax)"))
    role = Role("learner rank", n, cfg.gpus_per_learner, cfg.cpus_per_learner,
                f"{cfg.backend}" + (f" ZeRO-{z}" if cfg.backend == "deepspeed" else "") + f" across {n} rank(s), "
                f"{cfg.groups_per_step} groups per step (~{-(-cfg.groups_per_step // n)} per rank)", terms,
                gpu_bytes * min(1.0, cfg.gpus_per_learner) if on_gpu else None)
    if cfg.ema_decay:  # `learner/weight_average.py`: an fp32 copy on rank 0, in host memory
        average = Term("weight average", p * 4, f"{p:.4g} params x 4 B (learner.ema_decay; rank 0, host memory)")
        if on_gpu:
            role.notes.append(f"learner.ema_decay: rank 0 also holds {_gib(average.bytes)} of host memory "
                              "(an fp32 copy of the weights)")
        else:
            role.terms.append(average)
    if cfg.groups_per_step < n:
        role.notes.append(f"learner.groups_per_step={cfg.groups_per_step} < {n} ranks: some ranks train on "
                          "nothing each step")
    return role


def _engine_settings(r: RolloutConfig) -> tuple[int, float, int, str]:
    """(tensor parallel, memory utilisation, longest sequence, Mamba SSM cache dtype) of one engine."""
    if r.engine == "vllm":
        kw = r.vllm_kwargs
        return (int(kw.get("tensor_parallel_size", 1)), float(kw.get("gpu_memory_utilization", 0.9)),
                int(kw.get("max_model_len", r.max_len)), str(kw.get("mamba_ssm_cache_dtype", "auto")))
    return 1, 1.0, r.max_len, "float32"


def engine_role(arch: Architecture, r: RolloutConfig, dtype: str, gpu_bytes: float) -> Role:
    """One engine's memory per GPU: weights split by tensor parallelism, a Mamba state per sequence
    in flight, and the KV cache (vLLM gives it whatever its share of the GPU leaves)."""
    tp, util, max_len, ssm_dtype = _engine_settings(r)
    on_gpu = r.gpus_per_worker > 0
    bw = 2 if on_gpu and dtype == "float32" and r.engine == "vllm" else DTYPE_BYTES[dtype]
    ssm_bytes = 4 if ssm_dtype == "float32" else bw
    seqs = r.max_concurrent_episodes
    mamba = seqs * arch.mamba_bytes_per_sequence(bw, ssm_bytes, tp)
    kv_token = arch.kv_bytes_per_token(bw, tp)
    terms = [Term("weights", arch.params * bw / tp, f"{arch.params:.4g} params x {bw} B / TP {tp}")]
    if arch.layers.get("mamba"):
        terms.append(Term("Mamba state", mamba, f"{seqs} sequences x {_gib(mamba / seqs)} "
                          f"({arch.layers['mamba']} layers, SSM in {ssm_bytes} B, split by TP {tp})"))
    role = Role("rollout engine", r.num_workers, r.gpus_per_worker, r.cpus_per_worker,
                f"{r.engine}, tensor parallel {tp}, up to {seqs} sequences of {max_len} tokens", terms,
                gpu_bytes * util if on_gpu else None, kv_token=kv_token)
    full = seqs * max_len * kv_token
    if r.engine == "vllm" and on_gpu:
        terms.append(Term("vLLM buffers", ENGINE_OVERHEAD, "CUDA graphs, sampler, activations (rule of thumb)"))
        left = role.budget - role.total
        kv = max(0.0, min(left, full))
        terms.append(Term("KV cache", kv, f"what is left of {util:g} x GPU, up to {seqs} x {max_len} tokens x "
                          f"{kv_token} B/token"))
        if kv_token:
            fit = int(left // (max_len * kv_token)) if left > 0 else 0
            role.notes.append(f"{min(fit, seqs)} of {seqs} sequences fit at full length ({max_len} tokens) at once; "
                              "vLLM queues the rest")
    else:
        terms.append(Term("KV cache", full, f"{seqs} slots x {max_len} tokens x {kv_token} B/token"))
    return role


def _nodes(roles: list[Role], gpus_per_node: int) -> tuple[int, int]:
    """(nodes, GPUs): each role on whole nodes of its own, as learners and engines run decoupled."""
    nodes, gpus = 0, 0
    for role in roles:
        if role.gpus_each:
            per_node = max(1, int(gpus_per_node // role.gpus_each))
            nodes += math.ceil(role.processes / per_node)
            gpus += math.ceil(role.processes * role.gpus_each)
    return max(1, nodes), gpus


def _check_learner(role: Role, cfg: Config) -> None:
    lc = cfg.learner
    if lc.num_learners > 1 and lc.backend != "deepspeed":
        raise ConfigError(f"learner.num_learners={lc.num_learners} needs learner.backend=deepspeed "
                          "(the torch backend is one process)")
    if role.budget is None or role.total <= role.budget:
        return
    worst = max(role.terms, key=lambda t: t.bytes)
    fixes = {
        "weights": "set learner.zero_stage=3 and raise learner.num_learners (ZeRO-3 shards the weights)",
        "reference": "set learner.zero_stage=3 and raise learner.num_learners (ZeRO-3 shards the reference too)",
        "gradients": "set learner.zero_stage=2 or 3 and raise learner.num_learners",
        "optimizer state": "set learner.zero_stage >= 1 and raise learner.num_learners",
        "ZeRO-3 gathered": "use GPUs with more memory (cluster.gpu_memory_gb): one layer does not fit",
        "activations": "set learner.activation_checkpointing=true or lower learner.micro_batch_tokens "
                       "(and rollout.max_len: a sequence is never split)",
        "logits": "set learner.logprob_chunk (e.g. 4096: log-probs a chunk of positions at a time), or "
                  "lower learner.micro_batch_tokens and the longest sequence (rollout.max_len / "
                  "vllm_kwargs.max_model_len)",
    }
    raise ConfigError(f"the learner does not fit: {_gib(role.total)} per GPU of cluster.gpu_memory_gb="
                      f"{cfg.cluster.gpu_memory_gb:g} x learner.gpus_per_learner={lc.gpus_per_learner:g}; the "
                      f"largest term is {worst.what} ({_gib(worst.bytes)}): {fixes[worst.what]}")


def _check_engine(role: Role, cfg: Config) -> None:
    r = cfg.rollout
    tp = _engine_settings(r)[0]
    if r.engine == "vllm" and r.gpus_per_worker and tp != r.gpus_per_worker:
        raise ConfigError(f"rollout.vllm_kwargs.tensor_parallel_size={tp} needs rollout.gpus_per_worker={tp} "
                          f"(it is {r.gpus_per_worker:g}): an engine holds one GPU per tensor-parallel rank")
    if r.gpus_per_worker > cfg.cluster.gpus_per_node:
        raise ConfigError(f"rollout.gpus_per_worker={r.gpus_per_worker:g} exceeds cluster.gpus_per_node="
                          f"{cfg.cluster.gpus_per_node}: an engine runs on one node")
    if role.budget is None:
        return
    kv = next(t for t in role.terms if t.what == "KV cache")
    before_kv = role.total - kv.bytes
    one_sequence = _engine_settings(r)[2] * role.kv_token  # vLLM must hold one full-length sequence
    if role.total > role.budget or before_kv + one_sequence > role.budget:
        raise ConfigError(f"a rollout engine does not fit: {_gib(before_kv)} per GPU before its KV cache and "
                          f"{_gib(one_sequence)} for one full-length sequence, of "
                          f"{_gib(role.budget)} (cluster.gpu_memory_gb x gpu_memory_utilization); raise "
                          "rollout.vllm_kwargs.gpu_memory_utilization or tensor_parallel_size (with "
                          "rollout.gpus_per_worker), or lower rollout.max_concurrent_episodes")


def plan_run(cfg: Config, arch: Architecture | None = None) -> Plan:
    """The placement and memory plan of `cfg`, or a ConfigError naming what to change."""
    arch = arch or architecture_of(cfg.model)
    gpu = cfg.cluster.gpu_memory_gb * GIB
    engine = engine_role(arch, cfg.rollout, cfg.model.dtype, gpu)
    reference = max([cfg.learner.kl_coef] + [e.kl_coef or 0.0 for e in cfg.environments.values()]) > 0
    learner = learner_role(arch, cfg.learner, cfg.model.dtype, _engine_settings(cfg.rollout)[2], gpu, reference)
    _check_learner(learner, cfg)
    _check_engine(engine, cfg)
    nodes, gpus = _nodes([learner, engine], cfg.cluster.gpus_per_node)
    local = cfg.services.ray
    if local.address is None and local.num_gpus is not None and gpus > local.num_gpus:
        raise ConfigError(f"the plan needs {gpus} GPUs but services.ray.num_gpus={local.num_gpus}: lower "
                          "learner.num_learners, learner.gpus_per_learner, rollout.num_workers or "
                          "rollout.gpus_per_worker")
    return Plan(arch, [learner, engine], nodes, gpus)
