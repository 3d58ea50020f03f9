"""Where a policy's math goes wrong: the operands its thought copies, the facts it states, the answer.

    .venv/bin/python scripts/probe_math.py POLICY_DIR [--instances 128] [--samples 4] [key=value ...]

Samples the quick start's held-out math prompts (`configs/tiny_cpu.yaml`, T=1, no budget) and
parses every thought of the form `a op b = c` on a `Compute a op b.` problem: how often each
operand and the operator match the prompt's, how often `c` is the true value of the thought's own
operands (a fact the policy knows), and how often the boxed answer repeats `c`. Pass rates alone
cannot say whether a policy fails at copying, at arithmetic or at answering. It also prints
pass@1 per problem kind, and for `largest` problems how often the answer is one of the listed
numbers (guessing one of them is right 1 time in 3-5). Last, how many of the 200 single-digit facts
the policy's thought states right when led through the reference thought up to the result.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

_PROBLEM = re.compile(r"Compute (\d+) ([+-]) (\d+)\.")
_THOUGHT = re.compile(r"<think>\s*(?:Compute )?(-?\d+) ([+-]) (-?\d+) = (?:\\boxed\{)?(-?\d+)")
_BOXED = re.compile(r"\\boxed\{(-?\d+)\}")
_LARGEST = re.compile(r"Which is the largest of ([\d, ]+)\?")


def kind_of(prompt_and_response: str) -> str:
    if _LARGEST.search(prompt_and_response):
        return "largest"
    return "arithmetic" if _PROBLEM.search(prompt_and_response) else "word"


def tally_largest(prompt_and_response: str, counts: Counter) -> None:
    """Count a `largest` sample whose boxed answer is one of the listed numbers."""
    listed = _LARGEST.search(prompt_and_response)
    boxed = _BOXED.findall(prompt_and_response.rsplit("</think>", 1)[-1])
    if listed is not None and boxed:
        counts["largest: answer is a listed number"] += boxed[-1] in listed.group(1).split(", ")


def tally(prompt_and_response: str, counts: Counter, correct: bool = False) -> None:
    """Count what one sample's thought got right (the text holds the prompt, then the response).
    A right answer counts as reasoned when its thought states the problem's own sum, right;
    otherwise it is a guess, which RL can only reinforce prompt by prompt."""
    counts["samples"] += 1
    problem = _PROBLEM.search(prompt_and_response)
    thought = _THOUGHT.search(prompt_and_response)
    if problem is None:
        return
    counts["arithmetic problems"] += 1
    if thought is None:
        counts["right answers after a wrong thought or none"] += correct
        return
    counts["thoughts a op b = c"] += 1
    a, op, b, c = thought.groups()
    copied = (a, op, b) == problem.groups()
    fact = int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    counts["first operand copied"] += a == problem.group(1)
    counts["operator copied"] += op == problem.group(2)
    counts["second operand copied"] += b == problem.group(3)
    counts["c is a op b (a true fact)"] += fact
    counts["thought right (copied, true)"] += copied and fact
    boxed = _BOXED.findall(prompt_and_response[thought.end():])
    counts["boxed answer repeats c"] += bool(boxed) and boxed[-1] == c
    counts["right answers after a right thought"] += correct and copied and fact
    counts["right answers after a wrong thought or none"] += correct and not (copied and fact)


def facts_known(policy, env_cfg) -> tuple[int, int]:
    """(right, asked): of the single-digit facts the environment asks about, how many the policy's
    thought states right, teacher-forced through the quoted reference thought (`Compute a op b =
    \\boxed{`) with the result's tokens taken greedily (0 of 0 for kinds without such sums)."""
    import torch

    from environments import env_factory

    env, tok, found, right = env_factory(env_cfg)(), policy.tokenizer, {}, 0
    for seed in range(20_000):  # one prompt per fact, in the environment's own words
        env.reset(seed=seed)
        problem = _PROBLEM.match(env.task.prompt)
        if problem and int(problem.group(1)) < 10 and int(problem.group(3)) < 10:
            found.setdefault(problem.groups(), env.task.prompt)
    for (a, op, b), prompt in found.items():
        head = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False) + f"<think>Compute {a} {op} {b} = \\boxed{{"
        result = str(int(a) + int(b) if op == "+" else int(a) - int(b))
        # encoded whole, as the policy writes it: `{-` of a negative result is one token
        line = tok(head + result + "}", add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([line["input_ids"]])
        first = next(i for i, (_, end) in enumerate(line["offset_mapping"]) if end > len(head))
        with torch.no_grad():
            logits = policy.model(ids).logits[0, first - 1: -2]  # predicts the result's tokens
        right += bool((logits.argmax(-1) == ids[0, first:-1]).all())
    return right, len(found)


def main() -> None:
    from configs import load_config
    from environments import env_factory
    from models.policy import load_policy
    from rollout.episodes import Prompt, run_groups
    from rollout.torch_engine import TorchEngine
    from rollout.worker import sampling_params

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("policy")
    parser.add_argument("--instances", type=int, default=128)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. 'environments.math.kwargs.kinds=[count_on]'")
    args = parser.parse_args()
    cfg = load_config("tiny_cpu", args.overrides)
    policy, env = load_policy(args.policy), cfg.environments["math"]
    make = env_factory(env)
    engine = TorchEngine(policy, max_batch=max(32, args.samples), max_len=cfg.rollout.max_len, seed=0)
    prompts = [Prompt("math", env.id, make, cfg.eval.seed_offset + i, env.timeout_s) for i in range(args.instances)]
    with ThreadPoolExecutor(4) as pool:
        groups = run_groups(engine, policy.tokenizer, prompts, args.samples, sampling_params(cfg.rollout), pool,
                            cfg.rollout.max_len)
    counts: Counter = Counter()
    for group in groups:
        for sample in group.samples:
            text, correct = policy.tokenizer.decode(sample.token_ids), sample.reward_parts.get("correct", 0.0) >= 1.0
            counts["correct"] += correct
            kind = kind_of(text)
            counts[f"{kind}: samples"] += 1
            counts[f"{kind}: correct"] += correct
            tally(text, counts, correct)
            tally_largest(text, counts)
    for key in ("samples", "correct", "arithmetic problems", "thoughts a op b = c", "first operand copied",
                "operator copied", "second operand copied", "c is a op b (a true fact)", "thought right (copied, true)",
                "boxed answer repeats c", "right answers after a right thought",
                "right answers after a wrong thought or none",
                *sorted(k for k in counts if ": " in k)):
        print(f"{key:36s} {counts[key]}")
    right, asked = facts_known(policy, env)
    print(f"{'facts stated right':36s} {right} of {asked}")


if __name__ == "__main__":
    main()
