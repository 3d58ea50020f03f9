"""The starting policy's held-out evaluation, cached beside the warm start.

    results = start_evaluation(cfg, policy_dir, compute=lambda: evaluate(...), say=print)

The evaluation is a pure function of the weights it scores, the evaluation's settings, the
environments and the sampler (`estuary.evaluate`: every environment and budget gets a fresh
engine seeded by `run.seed`), so a re-run from the same cached warm start would spend its first
minute recomputing numbers it already has (at 512 instances per environment the first RL step
came 69-76 s into runs that computed it, 10 s into one that reused it, on 2 cores). The result is kept under `$ESTUARY_CACHE/start_eval/<key>.json`, keyed by the weights'
bytes (not the config that built them: a restarted run keeps the policy it started from whatever
its config says now), every setting the evaluation reads, the source of the code that computes
it and the machine (float sums differ by CPU and kernels: README, "What the quick start shows
today"). Only tiny presets are cached, as the warm start is (`estuary.warm_start`): hashing a
large `model.path` checkpoint costs more than it saves. `eval.cache_start=false` (or
`sft.cache=false`) turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from configs.schema import Config

Results = dict[str, dict[str, float]]
_ROOT = Path(__file__).resolve().parent.parent
# Code the numbers come from beyond what `warm_start.source_digest` covers (the engine, the
# environments and their rewards are in it).
_SOURCES = ("estuary/evaluate.py", "estuary/eval_stats.py")
# An environment's settings that shape RL's groups only: the evaluation never reads them.
_RL_ONLY = ("weight", "sft_weight", "kl_coef", "max_staleness", "overlong_filter", "reference_kl_coef")


def cache_dir() -> Path:
    from estuary.warm_start import estuary_cache

    return estuary_cache() / "start_eval"


def start_eval_key(cfg: Config, policy_dir: Path) -> str | None:
    """A digest of everything that determines the starting policy's evaluation (None: not cached)."""
    from estuary.warm_start import machine, source_digest

    if not (cfg.eval.cache_start and cfg.sft.cache) or cfg.model.path:
        return None
    weights = hashlib.sha256()
    for file in sorted(p for p in Path(policy_dir).iterdir() if p.is_file() and p.name != "built_on.json"):
        weights.update(file.name.encode())
        weights.update(file.read_bytes())
    code = hashlib.sha256(source_digest().encode())
    for name in _SOURCES:
        code.update((_ROOT / name).read_bytes())
    evaluation = asdict(cfg.eval)
    evaluation.pop("every_steps")  # when later evaluations happen, not what the first one scores
    evaluation.pop("cache_start")
    environments = {name: {k: v for k, v in asdict(env).items() if k not in _RL_ONLY}
                    for name, env in sorted(cfg.environments.items())}
    inputs = {"weights": weights.hexdigest(), "eval": evaluation, "rollout": asdict(cfg.rollout),
              "environments": environments, "model": asdict(cfg.model), "seed": cfg.run.seed,
              "code": code.hexdigest(), "machine": machine()}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]


def start_evaluation(cfg: Config, policy_dir: Path, compute: Callable[[], Results], say=print) -> Results:
    """`compute()`'s results, or the same results stored by an earlier run with the same key."""
    key = start_eval_key(cfg, policy_dir)
    path = cache_dir() / f"{key}.json" if key else None
    if path is not None and path.is_file():
        try:
            results = json.loads(path.read_text())
            say(f"eval (start): reusing the cached evaluation of this warm start {path} "
                "(delete it or set eval.cache_start=false to recompute)")
            # json keeps the order: environments and budgets print as a fresh evaluation prints them
            return {name: {k: float(v) for k, v in scores.items()} for name, scores in results.items()}
        except (OSError, ValueError, AttributeError):  # damaged: recompute and overwrite it
            pass
    results = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(results, indent=1))
        staging.replace(path)  # atomic: a half-written file is never read as a whole one
    return results
