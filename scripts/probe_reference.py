"""Where a trained policy stopped saying what its warm start said: teacher-forced reference answers.

    .venv/bin/python scripts/probe_reference.py WARM_START POLICY_DIR [POLICY_DIR ...] [--env code]
        [--instances 24] [key=value ...]

Feeds each held-out prompt of one environment of the quick start (`configs/tiny_cpu.yaml`, seeds
from `eval.seed_offset`) with the environment's own reference answer and reads, under every
policy given, the probability of each reference token. Per task family (a code task's function,
otherwise the environment) it prints the mean and the smallest of those probabilities and the
exact KL(policy || warm start) summed over the answer's positions; then, for the first instance
of each family, the positions where some policy lost most against the warm start, with the
policies' probabilities side by side. Sampled pass rates say that a policy got worse; this says
where: session 36 found each collapsed run's code had lost one near-certain token of the
answer's skeleton (P('):' | 'def add_k(x') 1.00 -> 0.00) while a healthy run kept it at 1.00.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch


def reference_rows(env_name: str, instances: int, overrides: list[str]) -> list[tuple[str, list[int], list[int]]]:
    """(family, prompt ids, prompt + reference answer ids) per held-out instance."""
    from configs import load_config
    from environments import env_factory

    cfg = load_config("tiny_cpu", overrides)
    if env_name not in cfg.environments:
        raise SystemExit(f"--env {env_name!r}: the quick start has {sorted(cfg.environments)}")
    make = env_factory(cfg.environments[env_name])
    rows = []
    for i in range(instances):
        env = make()
        messages, _ = env.reset(seed=cfg.eval.seed_offset + i)
        task = getattr(getattr(env, "unwrapped", env), "task", None)
        family = (task.data.get("entry_point") if task is not None else "") or env_name
        rows.append((family, messages, env.reference_answer()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policies", nargs="+", help="the warm start first, then the policies to compare")
    parser.add_argument("--env", default="code")
    parser.add_argument("--instances", type=int, default=24)
    args, overrides = parser.parse_known_args()
    from models.policy import load_policy

    policies = [load_policy(p) for p in args.policies]
    tok = policies[0].tokenizer
    sums: dict[str, list] = defaultdict(lambda: [0, 0.0, 1.0, 0.0])  # n, mean P, min P, KL (per policy)
    shown: set[str] = set()
    for family, messages, answer in reference_rows(args.env, args.instances, overrides):
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        p_len = len(tok(prompt, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tok(prompt + answer, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logps = torch.stack([torch.log_softmax(p.model(ids).logits[0, p_len - 1:-1].float(), -1)
                                 for p in policies])  # (P, T, V): the answer's positions
        target = ids[0, p_len:]
        prob = logps.gather(2, target[None, :, None].expand(len(policies), -1, 1))[..., 0].exp()  # (P, T)
        kl = (logps.exp() * (logps - logps[0])).sum(-1)  # (P, T)
        s = sums[family]
        s[0] += 1
        s[1] = s[1] + prob.mean(1)
        s[2] = torch.minimum(torch.as_tensor(s[2]), prob.min(1).values)
        s[3] = s[3] + kl.sum(1)
        if family not in shown and len(policies) > 1:
            shown.add(family)
            words = [tok.decode([t]) for t in target.tolist()]
            for t in (prob[0] - prob[1:].min(0).values).argsort(descending=True)[:3].tolist():
                print(f"  {family}: ...{''.join(words[max(0, t - 6):t])!r} -> {words[t]!r}: "
                      + " ".join(f"{v:.2f}" for v in prob[:, t].tolist()))
    print(f"{'family':<14} {'n':>3}  mean P(reference token) | smallest | KL(pi || warm start), summed over the answer")
    for family, (n, mean, low, kl) in sums.items():
        row = lambda xs, f: " ".join(f.format(v) for v in xs.tolist())  # noqa: E731
        print(f"{family:<14} {n:>3}  {row(mean / n, '{:.2f}')} | {row(low, '{:.3f}')} | {row(kl / n, '{:.1f}')}")
    print("columns:", " ".join(args.policies))


if __name__ == "__main__":
    main()
