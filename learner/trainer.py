"""The learner's optimizer side: DeepSpeed ZeRO (gloo on CPU, NCCL on GPU) or plain torch.

    trainer = Trainer(model, TrainerOptions(backend="deepspeed", zero_stage=2, lr=1e-5))
    stats = trainer.step(micro_batches, Objective(loss=LossConfig(...)))
    stats = trainer.train(micro_batches, objective, minibatches=2)   # PPO-style: 2 steps per batch

Both backends run the same GRPO step: every micro-batch's loss is weighted by its share of the
step's trained tokens and back-propagated, then one optimizer step (one gradient-accumulation
boundary however many micro-batches the token budget produced). With several data-parallel
learners (DeepSpeed, `WORLD_SIZE` > 1) the ranks agree on the step's total tokens and on the
number of micro-batches (a rank with fewer runs empty ones), so every rank's token counts for
the same weight and ZeRO-3's collective forward passes stay in step. DeepSpeed's JIT-built ops are
cached under `TORCH_EXTENSIONS_DIR` (default `~/.cache/estuary/torch_extensions`): paid once
per machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from learner.batching import MicroBatch
from learner.collectives import all_reduce, control_group, world
from learner.losses import LossConfig
from learner.objective import Objective, microbatch_loss, reference_logprobs
from models.extension_build import extensions_dir, load_deepspeed_shm_comm
from models.mamba_chunked import set_scan_chunk


@dataclass(frozen=True)
class TrainerOptions:
    backend: str = "deepspeed"  # deepspeed | torch
    zero_stage: int = 2
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_decay_to: float = 1.0  # the lr's multiplier once `progress` reaches 1 (linear in progress)
    max_grad_norm: float = 1.0
    freeze_router: bool = True
    keep_reference: bool = False  # keep a frozen copy of the initial policy (for the KL term)
    activation_checkpointing: bool = False  # recompute layer activations in backward (long sequences)
    ema_decay: float = 0.0  # > 0: rank 0 keeps an average of the weights (`learner/weight_average.py`)
    scan_chunk: int = 16  # the Mamba-2 scan's chunk on CPU (`learner.scan_chunk`); 0: the model's own


def _init_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from streams.redis_server import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    import deepspeed

    load_deepspeed_shm_comm()  # under a lock a killed process cannot leave behind
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def freeze_routers(model: torch.nn.Module) -> int:
    """Stop gradients into MoE router weights (Nemotron 3 Nano's RL recipe); returns how many."""
    frozen = 0
    for name, p in model.named_parameters():
        if ".gate." in name or name.endswith(".gate.weight"):
            p.requires_grad_(False)
            frozen += 1
    return frozen


def _empty_like(batch: MicroBatch | None) -> MicroBatch:
    """A one-token micro-batch that trains on nothing (keeps ranks' forward passes aligned)."""
    one = torch.zeros(1, 2, dtype=torch.long)
    return MicroBatch(one, torch.zeros(1, 2), torch.zeros(1, 2), torch.full((1, 2), -1), torch.zeros(1), 0,
                      torch.tensor([2]), None if batch is None or batch.routed is None
                      else torch.full((1, 2, *batch.routed.shape[2:]), -1, dtype=torch.int16))


def _buckets(state: dict[str, torch.Tensor], max_bytes: int):
    """(name, tensor) pairs in runs of at most `max_bytes` (a bigger tensor goes alone)."""
    bucket, size = [], 0
    for name, t in state.items():
        n = getattr(t, "ds_numel", t.numel()) * t.element_size()  # a ZeRO-3 parameter's full size
        if bucket and size + n > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


class Trainer:
    def __init__(self, model: torch.nn.Module, options: TrainerOptions) -> None:
        self.options = options
        self.model = model
        if options.freeze_router:
            freeze_routers(model)
        if options.activation_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ValueError(f"{type(model).__name__} does not support learner.activation_checkpointing")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.reference = None
        if options.keep_reference:
            import copy

            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
        self.progress = 0.0  # how far RL is towards its end, 0..1 (`set_progress`)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        self.engine = None
        if options.backend == "deepspeed":
            extensions_dir()  # before DeepSpeed is imported: it builds its ops where this points
            import deepspeed

            _init_process_group()
            config = {
                "train_micro_batch_size_per_gpu": 1,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": options.max_grad_norm or 0.0,
                "zero_optimization": {"stage": options.zero_stage},
                "zero_allow_untested_optimizer": True,
                "bf16": {"enabled": torch.cuda.is_available() and torch.cuda.is_bf16_supported()},
            }
            self.engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            if self.reference is not None and options.zero_stage == 3:
                # The frozen reference sharded like the policy (each rank holds 1/N, gathered layer
                # by layer in its forward pass), not a whole copy per rank: an engine without an
                # optimizer, as OpenRLHF keeps its reference model.
                frozen = {k: v for k, v in config.items() if k != "gradient_clipping"}
                self.reference = deepspeed.initialize(model=self.reference, config=frozen)[0]
        elif options.backend != "torch":
            raise ValueError(f"unknown learner backend {options.backend!r}; choose deepspeed or torch")
        self.rank, self.world_size = world()
        if self.world_size > 1 and self.engine is None:
            raise ValueError("several learners need learner.backend=deepspeed (the torch backend is single-process)")
        if self.world_size > 1:
            control_group()  # every rank creates it here, at the same point (a collective call)
        self.optimizer = optimizer
        self.steps = 0
        self.average = None  # the final policy's weight average, on rank 0 only (ZeRO-3 refused in config)
        if options.ema_decay and self.rank == 0:
            from learner.weight_average import WeightAverage

            self.average = WeightAverage(model, options.ema_decay)
        # Where the forward pass runs (DeepSpeed places the module itself): micro-batches go there.
        self.device = self.engine.device if self.engine is not None else next(model.parameters()).device
        if self.reference is not None and not hasattr(self.reference, "module"):  # an engine places itself
            self.reference.to(self.device)
        if options.scan_chunk and self.device.type == "cpu":
            for module in (model, self.reference):
                set_scan_chunk(module, options.scan_chunk)

    def _lr_factor(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, self.options.warmup_steps))
        return warm * (1.0 - (1.0 - self.options.lr_decay_to) * self.progress)

    def set_progress(self, progress: float) -> None:
        """RL is `progress` (0..1) of the way to its end: the next step's learning rate follows."""
        self.progress = min(1.0, max(0.0, progress))
        factor = self._lr_factor(self.scheduler.last_epoch)
        for group, base in zip(self.scheduler.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * factor

    def train(self, batches: list[MicroBatch], objective: Objective, minibatches: int = 1,
              epochs: int = 1, extra=None) -> list[dict[str, float]]:
        """`epochs` passes of `minibatches` optimizer steps over `batches` (PPO-style); one statistics
        dict per step. `extra`: a loss every optimizer step adds (see `step`).

        With the decoupled objective and more than one step, the proximal log-probs (the weights
        before the first step) are recomputed for every micro-batch first: every later step's
        ratio is taken against them, so the clip bounds how far the batch moves the policy.
        """
        if self.world_size > 1:  # every rank runs the same number of forward passes (ZeRO-3)
            most = int(all_reduce([len(batches)], "max")[0])
            batches = batches + [_empty_like(batches[0] if batches else None) for _ in range(most - len(batches))]
        if minibatches * epochs > 1 and objective.decoupled:
            for batch in batches:
                batch.prox_logp = reference_logprobs(self.model, batch.to(self.device), objective)
        chunks = [batches[i::minibatches] for i in range(minibatches)]
        return [self.step(chunk, objective, extra) for _ in range(epochs) for chunk in chunks]

    def full_state_dict(self, bucket_bytes: int = 256 << 20) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (None on others); a collective call under ZeRO-3.

        Under ZeRO-3 the parameters are gathered `bucket_bytes` at a time and copied to host
        memory, so no device ever holds more than one bucket beyond its own shard (gathering a
        30B model at once does not fit on one GPU).
        """
        if self.engine is None or self.options.zero_stage != 3:
            return self.model.state_dict() if self.rank == 0 else None
        state: dict[str, torch.Tensor] = {}
        for bucket in _buckets(self.model.state_dict(keep_vars=True), bucket_bytes):
            state.update(self._gathered(bucket))
        return state if self.rank == 0 else None

    def _gathered(self, bucket: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Host copies of one bucket of (possibly ZeRO-3-partitioned) tensors on rank 0."""
        import deepspeed

        partitioned = list({id(t): t for _, t in bucket if hasattr(t, "ds_id")}.values())
        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            if self.rank != 0:
                return {}
            return {name: t.detach().to("cpu", copy=True) for name, t in bucket}

    def _counted(self) -> None:
        """A step is done: count it and average the weights it left (a step that trained nothing counts too)."""
        self.steps += 1
        if self.average is not None:
            self.average.update(self.model)

    def averaged_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model with its trained weights averaged (rank 0; None elsewhere); the plain
        weights when no average is kept."""
        state = self.full_state_dict()
        return self.average.applied(state) if state is not None and self.average is not None else state

    def _extra(self, extra, module) -> dict[str, float]:
        """Back-propagate `extra`'s loss as the step's last gradient (the accumulation boundary)."""
        loss, stats = extra(module, self.model, self.reference, self.device)
        if self.engine is not None:
            self.engine.set_gradient_accumulation_boundary(True)
            self.engine.backward(loss)
        else:
            loss.backward()
        return stats

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def step(self, batches: list[MicroBatch], objective: Objective | LossConfig, extra=None) -> dict[str, float]:
        """One optimizer step over `batches`; returns token-weighted statistics.

        `extra(module, model, reference, device) -> (loss, stats)`: a term of its own scale added to
        the step (`learner.reference_kl`), back-propagated after the micro-batches, on every rank.
        """
        if isinstance(objective, LossConfig):  # the plain clipped loss against the behaviour policy
            objective = Objective(loss=objective, decoupled=False)
        local = sum(b.n_tokens for b in batches)
        total, n_micro = float(local), len(batches)
        if self.world_size > 1:
            total, = all_reduce([local], "sum")
            n_micro = int(all_reduce([len(batches)], "max")[0])
        if total == 0 and extra is not None:
            n_micro = 0  # no policy token anywhere: the step trains the extra term alone
        elif total == 0:  # nothing to train anywhere (every sample cut and filtered, say): the
            # weights stay as they are, but the step counts, so the version moves on with it
            self.scheduler.step()
            self._counted()
            return {"loss": 0.0, "trained_tokens": 0, "lr": self.scheduler.get_last_lr()[0]}
        module = self.engine if self.engine is not None else self.model
        module.train()
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        weights: dict[str, int] = {}
        for i in range(n_micro):
            batch = batches[i] if i < len(batches) else _empty_like(batches[0] if batches else None)
            loss, stats = microbatch_loss(module, self.model, batch.to(self.device), objective, self.reference)
            # DeepSpeed averages gradients over ranks: scaling by world size makes the result the
            # mean over every rank's tokens.
            share = batch.n_tokens / total * self.world_size
            if self.engine is not None:
                self.engine.set_gradient_accumulation_boundary(i == n_micro - 1 and extra is None)
                self.engine.backward(loss * share)
            else:
                (loss * share).backward()
            for key, value in {"loss": loss.item(), **stats}.items():
                sums[key] = sums.get(key, 0.0) + value * batch.n_tokens
                weights[key] = weights.get(key, 0) + batch.n_tokens
        # token-weighted over the micro-batches that report a statistic (`kl` only where a row has the term)
        sums = {key: value / max(weights[key], 1) for key, value in sums.items()}
        if extra is not None:
            sums.update(self._extra(extra, module))
        if self.engine is not None:
            self.engine.step()
            sums["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
            sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.options.max_grad_norm or float("inf")))
            self.optimizer.step()
        self.scheduler.step()
        module.eval()
        self._counted()
        sums["trained_tokens"] = local
        sums["lr"] = self.scheduler.get_last_lr()[0]
        return sums
