"""The `estuary` command line. Imports are lazy so `estuary --help` answers at once.

    estuary config show configs/tiny_cpu.yaml learner.lr=3e-6   # the resolved config
    estuary model init tiny-hybrid-moe out/tiny                 # a tiny random-init policy
    estuary envs                                                # registered environments
    estuary plan configs/nemotron3_nano_gpu.yaml                # placement and memory per GPU

Bad input (an unknown config key, a wrong type, a missing file) ends with one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

PRESET_NAMES = ("tiny-hybrid-moe", "tiny-hybrid-moe-2attn", "tiny-hybrid-dense", "tiny-attention", "hybrid-moe-100m")  # models/presets.py


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def _config_show(args: argparse.Namespace) -> int:
    from configs import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _model_init(args: argparse.Namespace) -> int:
    import time

    from transformers.utils import logging as hf_logging

    from models.policy import write_preset

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    out = write_preset(args.preset, args.out_dir, seed=args.seed)
    print(f"estuary: wrote {args.preset} to {out} in {time.perf_counter() - start:.1f}s")
    return 0


def _train_mtp(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from warmstart.train_mtp import train_mtp

    hf_logging.disable_progress_bar()
    result = train_mtp(args.policy_dir, env_ids=args.env or None, samples=args.samples,
                       steps=args.steps, lr=args.lr, max_new_tokens=args.max_new_tokens, seed=args.seed,
                       objective=args.objective, unroll=args.unroll)
    print(f"estuary: trained MTP heads on {result.samples} self-generations in {result.seconds:.0f}s: "
          f"loss {result.loss_start:.3f} -> {result.loss_end:.3f}; saved to {args.policy_dir}/mtp.safetensors")
    return 0


def _train(args: argparse.Namespace) -> int:
    from configs import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        return _print_plan(cfg)
    from estuary.train import train

    train(cfg)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from configs import load_config

    return _print_plan(load_config(args.config, args.overrides))


def _print_plan(cfg) -> int:
    """The plan, then what `estuary train` itself would still refuse (an error, exit status 2)."""
    from estuary.plan import plan_run
    from estuary.run_setup import check_run_config

    print(plan_run(cfg).render())
    check_run_config(cfg)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from configs import load_config
    from estuary.evaluate import evaluate
    from models.policy import load_policy

    cfg = load_config(args.config, args.overrides)
    unknown = [e for e in args.env or [] if e not in cfg.environments]
    if unknown:
        raise UsageError(f"--env {unknown[0]!r} is not an environment of {args.config}; "
                         f"choose from {', '.join(cfg.environments)}")
    if args.instances:
        cfg.eval.instances = args.instances
    results = evaluate(load_policy(args.checkpoint, dtype=cfg.model.dtype), cfg.environments, cfg.eval,
                       cfg.rollout, cfg.run.seed, only=args.env)
    from estuary.run_log import eval_summary

    n, k = cfg.eval.samples_per_instance, cfg.eval.pass_k
    print(f"{cfg.eval.instances} instances x {n} samples per environment (mean ± standard error, pass@{k} "
          f"unbiased from {n})")
    for name, r in results.items():
        print(f"{name:<24} {eval_summary(r)}")
    return 0


def _envs(args: argparse.Namespace) -> int:
    import environments

    rows = environments.describe()
    width = max(len(r.id) for r in rows)
    pkg_width = max(len(r.package) for r in rows)
    for r in rows:
        print(f"{r.id:<{width}}  {r.package:<{pkg_width}}  {r.description}")
    for package, error in environments.plugin_errors().items():
        print(f"estuary: warning: plug-in {package} failed to load: {error}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="estuary",
        description="Asynchronous multi-environment RL post-training for LLMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = sub.add_parser("config", help="inspect run configs").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    show = config.add_parser("show", help="print the resolved config (schema <- YAML <- overrides)")
    show.add_argument("config", help="YAML file, or a preset name in configs/ (e.g. tiny_cpu)")
    show.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    show.set_defaults(handler=_config_show)

    model = sub.add_parser("model", help="build and inspect policies").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    init = model.add_parser("init", help="write a tiny random-init policy as an HF directory")
    init.add_argument("preset", choices=PRESET_NAMES, help="which preset (the tiny ones build in a second; hybrid-moe-100m has 107M parameters)")
    init.add_argument("out_dir", help="directory to write (config.json, safetensors, tokenizer)")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    init.set_defaults(handler=_model_init)
    mtp = model.add_parser("train-mtp", help="fit MTP draft heads on a frozen NemotronH policy")
    mtp.add_argument("policy_dir", help="policy directory (heads are added if missing, saved beside it)")
    mtp.add_argument("--env", action="append", help="environment id for prompts (repeatable)")
    mtp.add_argument("--samples", type=int, default=256, help="self-generated answers to fit on")
    mtp.add_argument("--steps", type=int, default=200, help="optimizer steps")
    mtp.add_argument("--lr", type=float, default=2e-3, help="learning rate")
    mtp.add_argument("--max-new-tokens", type=int, default=64, help="tokens per generated answer")
    mtp.add_argument("--seed", type=int, default=0)
    mtp.add_argument("--objective", choices=["distill", "tokens"], default="distill",
                     help="match the policy's own distributions (distill) or its sampled tokens")
    mtp.add_argument("--unroll", type=int, default=2,
                     help="chained draft steps the distillation trains (the engine's mtp_steps)")
    mtp.set_defaults(handler=_train_mtp)

    run = sub.add_parser("train", help="run asynchronous multi-environment GRPO (local or in a Ray job)")
    run.add_argument("config", help="YAML preset (path, or a name under configs/: tiny_cpu)")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    run.add_argument("--dry-run", action="store_true", help="validate and print the plan (`estuary plan`); start nothing")
    run.set_defaults(handler=_train)

    plan = sub.add_parser("plan", help="validate a config and print its placement and memory per GPU")
    plan.add_argument("config", help="YAML preset (path, or a name under configs/)")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    plan.set_defaults(handler=_plan)

    ev = sub.add_parser("eval", help="score a policy on held-out environment instances")
    ev.add_argument("checkpoint", help="policy directory (a run's checkpoints/step-N or any HF directory)")
    ev.add_argument("--config", default="tiny_cpu", help="config that defines the environments (default tiny_cpu)")
    ev.add_argument("--env", action="append", help="environment name from the config (repeatable; default all)")
    ev.add_argument("--instances", type=int, default=0, help="held-out instances per environment")
    ev.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides (e.g. eval.budgets=[8] eval.samples_per_instance=8)")
    ev.set_defaults(handler=_eval)

    envs = sub.add_parser("envs", help="list registered environments (built-in and plug-ins)")
    envs.set_defaults(handler=_envs)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    # Imported only after parsing, and only the light modules: keeps --help fast.
    from configs.errors import ConfigError

    errors: list[type[BaseException]] = [ConfigError, UsageError]
    if "environments.registry" in sys.modules:
        errors.append(sys.modules["environments.registry"].EnvironmentNotFound)
    if "models.policy" in sys.modules:
        errors.append(sys.modules["models.policy"].PolicyError)
    if "rollout.torch_engine" in sys.modules:
        errors.append(sys.modules["rollout.torch_engine"].EngineError)
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except Exception as e:  # noqa: BLE001 - only user errors are caught below; others re-raise
        if isinstance(e, _user_errors()):
            print(f"estuary: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
