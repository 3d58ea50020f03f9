"""The stages before RL, cached: the starting policy, its warm-start SFT and its MTP heads.

    policy_dir = warm_start(cfg, run_dir / "policy", say=print)

A tiny preset written from a seed, copy-pretrained, SFT'd on the environments' reference answers and given MTP
heads fitted on its own generations is a pure function of its inputs, and on a 2-core CPU it is
most of a first run's time. So the result is kept under `$ESTUARY_CACHE/warm_start/<key>`
(default `~/.cache/estuary`), keyed by everything that determines it: the preset and seed, the
SFT and budget settings, every environment's id, weight, rewards and arguments, the MTP draft
settings, the evaluation seed offset (training seeds stay below it) and the source of the code
that builds it (models, environments, rewards, the SFT loop). A second run with the same inputs
copies the cached policy and says so; any change rebuilds it. A policy given by `model.path` is
the user's and is never cached (hashing a large checkpoint costs more than it saves).
`sft.cache=false` turns the cache off.

The same inputs do not build the same policy on every CPU: float sums differ with the CPU's
vendor and instruction set (MKL and oneDNN pick their kernels by both), and SFT of a tiny policy
amplifies the difference into different skills (README, "What the quick start shows today"). So
a build records the machine it ran on (`built_on.json`), and a reuse names it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from configs.schema import Config, EnvironmentConfig

# Source whose change changes the warm start (folders are hashed file by file, sorted).
_SOURCES = ("models", "environments", "rewards", "warmstart", "rollout")
_ROOT = Path(__file__).resolve().parent.parent


def estuary_cache() -> Path:
    """Where Estuary keeps what it builds once per machine: `$ESTUARY_CACHE`, else ~/.cache/estuary."""
    return Path(os.environ.get("ESTUARY_CACHE", Path.home() / ".cache" / "estuary"))


def cache_root() -> Path:
    return estuary_cache() / "warm_start"


def source_digest() -> str:
    digest = hashlib.sha256()
    for name in _SOURCES:
        path = _ROOT / name
        files = sorted(path.rglob("*.py")) + sorted(path.rglob("*.cpp")) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(_ROOT)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def sft_environments(cfg: Config) -> dict[str, EnvironmentConfig]:
    """The environments as SFT sees them: each weighted by its `sft_weight` where set (RL's
    `weight` otherwise), so that RL's mix can change while the warm start stays."""
    return {name: replace(env, weight=env.weight if env.sft_weight is None else env.sft_weight, sft_weight=None)
            for name, env in cfg.environments.items()}


def warm_start_key(cfg: Config) -> str:
    """A digest of everything that determines the warm-started policy."""
    inputs = {
        "preset": cfg.model.preset, "dtype": cfg.model.dtype, "seed": cfg.run.seed,
        "sft": asdict(cfg.sft), "budget": asdict(cfg.rollout.budget),
        "environments": {name: asdict(env) for name, env in sorted(sft_environments(cfg).items())},
        "mtp": bool(cfg.model.mtp_steps), "seed_offset": cfg.eval.seed_offset,
        "source": source_digest(),
    }
    inputs["sft"].pop("cache", None)  # whether to cache does not change what is built
    for env in inputs["environments"].values():  # RL's settings for an environment's groups
        env.pop("kl_coef", None)
        env.pop("max_staleness", None)
        env.pop("overlong_filter", None)
        env.pop("reference_kl_coef", None)
        env.pop("rewards", None)  # shaping terms: SFT imitates reference turns, it is never scored
        env.pop("sft_weight", None)  # folded into `weight` above
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


BUILT_ON = "built_on.json"


def machine() -> dict:
    """What decides a build's float paths beside its inputs: the CPU, torch and its kernels' ISA."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__, "kernels": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def _built_on(policy: Path) -> str:
    """The CPU a cached build recorded, or "" (an older build has no record; a damaged one is ignored:
    it only informs the message, and the weights are what is reused)."""
    try:
        return str(json.loads((policy / BUILT_ON).read_text()).get("cpu", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _pretrain(cfg: Config, out: Path, say) -> None:
    """What a pretrained model has and a tiny preset lacks: copying from the context, then copying
    a value into a new slot (each stage skipped at 0 steps)."""
    if cfg.sft.copy_steps:
        from warmstart.copy_pretrain import run_copy_pretraining

        copied = run_copy_pretraining(out, cfg.sft.copy_steps, cfg.sft.copy_length, cfg.sft.copy_lr,
                                      seed=cfg.run.seed)
        say(f"copy pretraining: {cfg.sft.copy_steps} steps, loss {copied.loss_start:.2f} -> "
            f"{copied.loss_end:.2f}, copy accuracy {copied.accuracy:.2f} in {copied.seconds:.0f}s")
    if cfg.sft.answer_steps:
        from warmstart.answer_pretrain import run_answer_pretraining

        answered = run_answer_pretraining(out, cfg.sft.answer_steps, cfg.sft.copy_lr, cfg.sft.copy_length,
                                          seed=cfg.run.seed)
        say(f"answer pretraining: {cfg.sft.answer_steps} steps, loss {answered.loss_start:.2f} -> "
            f"{answered.loss_end:.2f}, first copied token right {answered.accuracy:.2f} in {answered.seconds:.0f}s")


def _build(cfg: Config, out: Path, say) -> None:
    """Write the starting policy into `out`: the preset or `model.path`, SFT, MTP heads."""
    from models.mtp import MTP_FILE

    built_on = machine()
    say(f"warm start: building on {built_on['cpu']} (torch {built_on['torch']}, {built_on['kernels']} kernels, "
        f"{built_on['threads']} threads)")
    if cfg.model.path:
        shutil.copytree(cfg.model.path, out)
        say(f"policy: {cfg.model.path}")
    else:
        from models.policy import write_preset

        write_preset(cfg.model.preset, out, seed=cfg.run.seed)
        say(f"policy: tiny preset {cfg.model.preset} (seed {cfg.run.seed})")
        if cfg.sft.steps:  # part of the warm start: `sft.steps=0` skips the pretraining stages too
            _pretrain(cfg, out, say)
    if cfg.sft.steps:
        from rollout.worker import budget_range
        from warmstart.sft import run_sft

        result = run_sft(out, cfg.sft, sft_environments(cfg), seed=cfg.run.seed, seed_limit=cfg.eval.seed_offset,
                         budget=budget_range(cfg.rollout.budget),
                         unbudgeted=cfg.rollout.budget.unbudgeted_fraction)
        say(f"sft: {cfg.sft.steps} steps on {result.examples} reference conversations, "
            f"loss {result.loss_start:.2f} -> {result.loss_end:.2f} in {result.seconds:.0f}s")
    if cfg.model.mtp_steps and not (out / MTP_FILE).is_file():
        from warmstart.train_mtp import train_mtp

        env_ids = [(env.id, dict(env.kwargs)) for env in cfg.environments.values()]
        result = train_mtp(out, env_ids=env_ids, samples=128, steps=100, seed=cfg.run.seed,
                           unroll=cfg.model.mtp_steps)  # fitted through as many steps as it drafts
        say(f"mtp heads: loss {result.loss_start:.2f} -> {result.loss_end:.2f} in {result.seconds:.0f}s")
    (out / BUILT_ON).write_text(json.dumps(built_on, indent=1))


def warm_start(cfg: Config, target: Path, say=print) -> Path:
    """The run's starting policy at `target` (built, or copied from the cache); returns `target`."""
    if (target / "config.json").is_file():
        return target  # a restarted run keeps the policy it started from
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cacheable = cfg.sft.cache and not cfg.model.path and bool(cfg.sft.steps or cfg.model.mtp_steps)
    cached = cache_root() / warm_start_key(cfg) if cacheable else None
    if cached is not None and (cached / "config.json").is_file():
        start = time.perf_counter()
        shutil.copytree(cached, tmp)
        where = f", built on {_built_on(cached)}" if _built_on(cached) else ""
        say(f"warm start: reusing the cached policy {cached} ({time.perf_counter() - start:.1f}s{where}; "
            "delete it or set sft.cache=false to rebuild)")
    else:
        _build(cfg, tmp, say)
        if cached is not None:
            store_atomically(tmp, cached)
            say(f"warm start: cached as {cached}")
    tmp.rename(target)
    return target


def store_atomically(built: Path, cached: Path) -> None:
    """Copy into the cache atomically: a half-written entry is never taken for a whole one."""
    staging = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(built, staging)
    try:
        staging.rename(cached)
    except OSError:  # another run stored the same key first: theirs is as good
        shutil.rmtree(staging, ignore_errors=True)
