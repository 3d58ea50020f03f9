"""Learner checkpoints that resume exactly: the policy as an HF directory plus the trainer state.

    save_checkpoint(run_dir, policy, trainer, step=12, version=12, extra={"stream": ...})
    path = latest_checkpoint(run_dir)             # None before the first one
    meta = restore_checkpoint(path, policy, trainer)

Layout: `run_dir/checkpoints/step-000012/` holds the policy (config.json, safetensors,
tokenizer, MTP heads) and `trainer/` (optimizer state, DeepSpeed's shards under ZeRO, and one
`state-rank{r}.pt` per rank: scheduler, RNG, what that rank consumed from the stream);
`meta.json` holds step, policy version and whatever the caller adds.
A checkpoint is written into a temporary folder and renamed into place, and `LATEST` is
replaced atomically afterwards, so a learner killed mid-write resumes from the previous one.
Only the newest `keep` checkpoints stay, but what each committed one consumed stays for the
whole run in `checkpoints/commits/step-000012.json` (`record_commit`, `commit_records`): the
record that says which groups the run trained, and that none was trained twice.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.policy import Policy


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: str | Path, policy: Policy, trainer, step: int, version: int,
                    extra: dict[str, Any] | None = None, keep: int = 2,
                    rank_extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint; with several data-parallel ranks every rank calls this (collective).

    `extra` (rank 0's) goes to meta.json; `rank_extra` is each rank's own (e.g. its stream entries).
    """
    rank = getattr(trainer, "rank", 0)
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "trainer").mkdir(parents=True)
    trainer.barrier()
    state = trainer.full_state_dict()  # collective under ZeRO-3
    if rank == 0:
        policy.save(tmp, state)
    trainer_dir = tmp / "trainer"
    if trainer.engine is not None:
        trainer.engine.save_checkpoint(str(trainer_dir), tag="state")  # every rank writes its shard
    elif rank == 0:
        torch.save({"optimizer": trainer.optimizer.state_dict()}, trainer_dir / "optimizer.pt")
    average = getattr(trainer, "average", None)
    torch.save({"scheduler": trainer.scheduler.state_dict(), "rng": _rng_state(), "steps": trainer.steps,
                "extra": rank_extra or {}, "average": average.state_dict() if average is not None else None},
               trainer_dir / f"state-rank{rank}.pt")
    trainer.barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "version": version, **(extra or {})}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / f"LATEST.{os.getpid()}.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "LATEST")
        for old in sorted(p for p in root.glob("step-*") if p != final)[:-(keep - 1) or None]:
            shutil.rmtree(old, ignore_errors=True)
    trainer.barrier()
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    try:
        path = root / (root / "LATEST").read_text().strip()
    except FileNotFoundError:
        return None
    return path if (path / "meta.json").is_file() else None


def record_commit(run_dir: str | Path, step: int, record: dict[str, Any]) -> None:
    """Keep what the committed checkpoint of `step` consumed (written once: a record exists only
    for a committed checkpoint, and a committed step is never trained again)."""
    folder = Path(run_dir) / "checkpoints" / "commits"
    path = folder / f"step-{step:06d}.json"
    if path.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"step": step, **record}))
    os.replace(tmp, path)


def commit_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every commit's record, oldest first."""
    folder = Path(run_dir) / "checkpoints" / "commits"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("step-*.json"))]


def restore_checkpoint(path: str | Path, policy: Policy, trainer) -> dict[str, Any]:
    """Load weights, optimizer, scheduler and RNG from `path` into live objects.

    Returns meta.json plus this rank's own record under "rank".
    """
    path = Path(path)
    trainer_dir = path / "trainer"
    if trainer.engine is not None:
        # DeepSpeed restores the module's weights with its optimizer state (shards under ZeRO-3).
        trainer.engine.load_checkpoint(str(trainer_dir), tag="state")
    else:
        from models.policy import load_policy

        saved = load_policy(path)
        with torch.no_grad():
            policy.model.load_state_dict(saved.model.state_dict(), strict=False)
        trainer.optimizer.load_state_dict(torch.load(trainer_dir / "optimizer.pt", weights_only=False)["optimizer"])
    state = torch.load(trainer_dir / f"state-rank{getattr(trainer, 'rank', 0)}.pt", weights_only=False)
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.steps = state["steps"]
    average = getattr(trainer, "average", None)
    if average is not None:  # without a saved one (turned on at resume) it starts at the restored weights
        if state.get("average") is not None:
            average.load_state_dict(state["average"])
        else:
            average.restart(policy.model)
    _set_rng_state(state["rng"])
    return {**json.loads((path / "meta.json").read_text()), "rank": state.get("extra", {})}
