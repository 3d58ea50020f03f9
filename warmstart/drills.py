"""Arithmetic drills: the single-digit facts a pretrained model knows, for a random-init policy.

    ids, mask = drill_row(tokenizer, rng, facts=20)   # "Compute 7 + 5 = \\boxed{12}\n..." trained on results

A real post-training run starts from a model that can add; a tiny preset written from a seed
cannot, and the quick start's SFT shows each of the 200 single-digit facts (operands 0-9, `+`
and `-`) about eight times in 400 steps, which left the policy's sums at chance (README: "Why
math guesses"). Copy pretraining is the wrong place for them: spread through it, facts kept the
copy circuit from forming, and learned before SFT they did not survive it. So SFT batches carry
drill rows to the end (`sft.drill_rows`), lines of facts trained on their results only.

The lines are written as the math environment's reference thought writes a sum with
`environments.math.kwargs.quote=true` (`Compute 7 + 5 = \\boxed{12}`): a fact is recalled in
the context it was learned in. Drilled as bare `7 + 5 = 12` lines, the policy got 150 of the
200 right in that form and 14 in the quoted thought (teacher-forced, greedy). They are facts,
not problems: no prompt, seed, budget or answer turn appears in them, and the held-out problems
are drawn as before.
"""

from __future__ import annotations

import random

ANSWERED_EVERY = 4  # one line in four is a whole reference turn (see `drill_row`)
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b}


def fact(rng: random.Random, hi: int = 9) -> tuple[str, str]:
    """One fact as (`"Compute a op b = \\boxed{"`, `"c}"`): operands 0..hi, `+` or `-`."""
    a, b, op = rng.randint(0, hi), rng.randint(0, hi), rng.choice("+-")
    return f"Compute {a} {op} {b} = \\boxed{{", f"{OPS[op](a, b)}}}"


def _spans(line: str, left: str, right: str, answered: bool) -> list[tuple[int, int]]:
    """Character spans of `line` to train on: the fact's result, and the answer's copy of it."""
    start = line.index(left) + len(left)
    spans = [(start, start + len(right))]
    if answered:
        copy = line.rindex("\\boxed{") + len("\\boxed{")
        spans.append((copy, copy + len(right)))
    return spans


def drill_row(tokenizer, rng: random.Random, facts: int = 20,
              answered_every: int = ANSWERED_EVERY) -> tuple[list[int], list[int]]:
    """(token ids, mask with 1 on each fact's result and closing brace) of `facts` lines.

    Every `answered_every`-th line is a whole reference turn (`<think>Compute 7 + 5 = \\boxed{12}
    </think>` and `The answer is \\boxed{12}.`), trained on the answer's result too: drilled
    alone, a fact's `\\boxed{` means "add the operands before me", and the answer's `\\boxed{`,
    which has none before it, then guessed (its result repeated the thought's in 44 of 192
    samples); these lines teach that the answer copies the thought. 0 turns none into a turn.
    Each line is encoded whole, as the thought is: the tokenizer merges `{-` of a negative result
    into one token, which encoding the two parts apart would never show the policy."""
    ids: list[int] = []
    mask: list[int] = []
    for index in range(facts):
        left, right = fact(rng)
        answered = bool(answered_every) and index % answered_every == answered_every - 1
        line = (f"<think>{left}{right}</think>\nThe answer is \\boxed{{{right[:-1]}}}." if answered
                else left + right)
        spans = _spans(line, left, right, answered)
        encoded = tokenizer(line + "\n", add_special_tokens=False, return_offsets_mapping=True)
        ids += encoded["input_ids"]
        mask += [int(any(end > lo and begin < hi for lo, hi in spans))  # tokens reaching into a result
                 for begin, end in encoded["offset_mapping"]]
    return ids, mask


# Where an answer may copy a value into: the grader's box, a JSON string (its key random), a parenthesis.
ANSWER_SLOTS = (("\\boxed{", "}"), ("\\boxed{", "}"), ('{"KEY": "', '"}'), (" (", ")"))


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(lo, hi)))


def answer_line(rng: random.Random) -> tuple[str, str, str]:
    """(line, the answer's slot opening, the trained value and closing) of one answer drill:
    `<think>random words 3076.</think>\\boxed{3076}`, the value a number or a capitalised word."""
    value = str(rng.randint(1, 99999)) if rng.random() < 0.6 else _word(rng, 4, 8).capitalize()
    opening, closing = rng.choice(ANSWER_SLOTS)
    opening = opening.replace("KEY", _word(rng, 2, 7))
    words = " ".join(_word(rng, 2, 7) for _ in range(rng.randint(2, 8)))
    # Three slots in five come after other words, as a call's title comes after its tool's name.
    separator = rng.choice(("", "\n")) + " ".join(_word(rng, 2, 7) for _ in range(rng.choice((0, 0, 1, 2, 3))))
    return f"<think>{words} {value}.</think>{separator}{opening}{value}{closing}", opening, value + closing


def answer_row(tokenizer, rng: random.Random, lines: int = 8) -> tuple[list[int], list[int]]:
    """(token ids, mask with 1 on each answer's copy of its value) of `lines` answer drills.

    The answer copies the value its thought ended on: the skill every environment's answer needs
    (a needle's number into `\\boxed{}`, a looked-up name into a call) and the one SFT formed in
    some builds only, for it is not induction: the token before the copy (`{`) never preceded the
    value before, so copying heads keyed on the previous token cannot find it, and a warm start
    without it boxed the thought's number 2 times in 100 (teacher-forced first digit). The words
    are random letters, the values random: no task's text. Earlier lines' values stand in the
    context too, so the copy must take the latest thought's."""
    ids: list[int] = []
    mask: list[int] = []
    for _ in range(lines):
        line, opening, trained = answer_line(rng)
        start = line.rindex(opening) + len(opening)
        encoded = tokenizer(line + "\n", add_special_tokens=False, return_offsets_mapping=True)
        ids += encoded["input_ids"]
        mask += [int(end > start and begin < start + len(trained)) for begin, end in encoded["offset_mapping"]]
    return ids, mask
