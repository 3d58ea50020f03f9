"""The learner's optimizer side: DeepSpeed ZeRO (gloo on CPU, NCCL on GPU) or plain torch.

    trainer = Trainer(model, TrainerOptions(backend="deepspeed", zero_stage=2, lr=1e-5))
    stats = trainer.step(micro_batches, LossConfig(...))

Both backends run the same GRPO step: every micro-batch's loss is weighted by its share of the
step's trained tokens and back-propagated, then one optimizer step (one gradient-accumulation
boundary however many micro-batches the token budget produced). DeepSpeed's JIT-built ops are
cached under `TORCH_EXTENSIONS_DIR` (default `~/.cache/estuary/torch_extensions`): paid once
per machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from learner.batching import MicroBatch, token_logprobs
from learner.losses import LossConfig, policy_loss


@dataclass(frozen=True)
class TrainerOptions:
    backend: str = "deepspeed"  # deepspeed | torch
    zero_stage: int = 2
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    freeze_router: bool = True


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

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def freeze_routers(model: torch.nn.Module) -> int:
    """Stop gradients into MoE router weights (Nemotron 3 Nano's RL recipe); returns how many."""
    frozen = 0
    for name, p in model.named_parameters():
        if ".gate." in name or name.endswith(".gate.weight"):
            p.requires_grad_(False)
            frozen += 1
    return frozen


class Trainer:
    def __init__(self, model: torch.nn.Module, options: TrainerOptions) -> None:
        self.options = options
        self.model = model
        if options.freeze_router:
            freeze_routers(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
        warm = max(1, options.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
        self.engine = None
        if options.backend == "deepspeed":
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/estuary/torch_extensions"))
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
        elif options.backend != "torch":
            raise ValueError(f"unknown learner backend {options.backend!r}; choose deepspeed or torch")
        self.optimizer = optimizer
        self.steps = 0

    def step(self, batches: list[MicroBatch], loss_cfg: LossConfig) -> dict[str, float]:
        """One optimizer step over `batches`; returns token-weighted statistics."""
        total = sum(b.n_tokens for b in batches)
        if total == 0:
            return {"loss": 0.0, "trained_tokens": 0}
        module = self.engine if self.engine is not None else self.model
        module.train()
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for i, batch in enumerate(batches):
            logp = token_logprobs(module, batch.input_ids)
            loss, stats = policy_loss(logp, batch.behav_logp, batch.advantages, batch.loss_mask, loss_cfg)
            share = batch.n_tokens / total
            if self.engine is not None:
                self.engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
                self.engine.backward(loss * share)
            else:
                (loss * share).backward()
            for key, value in {"loss": loss.item(), **stats}.items():
                sums[key] = sums.get(key, 0.0) + value * share
        if self.engine is not None:
            self.engine.step()
            sums["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
            sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.options.max_grad_norm or float("inf")))
            self.optimizer.step()
        self.scheduler.step()
        module.eval()
        self.steps += 1
        sums["trained_tokens"] = total
        sums["lr"] = self.scheduler.get_last_lr()[0]
        return sums
