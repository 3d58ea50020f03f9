"""Math answer equivalence with math-verify, safe in threads and against answers that game it.

    ok, verdict = grade_math("<think>...</think> \\boxed{72}", "#### 72")   # (True, "correct")

The answer is the text after the thinking (its last `MAX_CHARS`). Before math-verify sees it:
- several `\\boxed{}` with different contents, or alternatives such as `71 \\lor 72` or `71 or
  72`, are `hedged` (0): a policy must commit to one answer (unless the gold is written so);
- an expression that would expand to something huge (a power tower, an exponent or factorial of
  six digits or more) is `too_large` (0);
- where the gold is a plain number, the answer's value must be a plain number too. An expression
  is `unevaluated` (`5 + 9`, `\\max(57, 91)`: math-verify would compute it for a policy that only
  restated the problem) and several numbers are `hedged` (`7 and 8`: it would take the last). The
  helper checks the value math-verify extracts (`rewards.math_helper`); for an answer without a
  boxed number, whose value math-verify picks out of the text, the text after its last `=`
  is checked here.
math-verify then runs in a helper process (`rewards.math_helper`) with a time limit, since sympy
can hold the GIL for minutes on an expression these checks miss; past it, the answer is
`too_large` too. Otherwise the verdict is `correct` or `wrong`. Sets, intervals and `\\pm` are
compared as math-verify does: as wholes, so `\\{71, 72\\}` or `[0, 100]` never equals 72.
"""

from __future__ import annotations

import re

from rewards.math_helper import verify_in_helper

MAX_CHARS = 2000
VERIFY_TIMEOUT_S = 5.0

_GSM_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
# Alternatives inside one answer: `\lor`, `\vee`, or the word "or" (bare or in \text{}).
_ALTERNATIVES = re.compile(r"\\(?:lor|vee)(?![A-Za-z])|(?<![A-Za-z\\])or(?![A-Za-z])")
# The same, between numbers, in an answer written without \boxed{}.
_TEXT_ALTERNATIVES = re.compile(r"\d\s*\$?\s*,?\s*(?:\\lor|\\vee|\bor)(?![A-Za-z])\s*\$?\s*-?\d")
_TOWER = re.compile(r"\^\s*\{[^{}]*[\^!]|\^\s*\d+\s*\^")  # an exponent holding a power/factorial
_BIG_EXPONENT = re.compile(r"\^\s*\{?\s*\d{6,}")
_BIG_FACTORIAL = re.compile(r"\d{6,}\s*!")
_PLAIN_GOLD = re.compile(r"\$?\s*-?\d+(?:\.\d+)?\s*\$?")
_NUMBERS = re.compile(r"\d+(?:[.,]\d+)*")
_EXPRESSION = re.compile(r"\d\s*[-+*/^×÷]\s*\d|[A-Za-z]\s*\(\s*-?\d|\\[A-Za-z]+\s*\{?\s*\d")


def normalise_gold(answer: str) -> str:
    """GSM8K gold answers end with `#### 42`; MATH ones are LaTeX, maybe inside \\boxed{}."""
    match = _GSM_ANSWER.search(answer)
    text = match.group(1).replace(",", "") if match else answer.strip()
    return text if text.startswith("$") or "\\boxed" in text else f"${text}$"


def final_answer(response: str) -> str:
    """The part of a response after the thinking (the whole of it if there is no </think>)."""
    return response.rsplit("</think>", 1)[-1][-MAX_CHARS:]


def boxed_contents(text: str) -> list[str]:
    """The contents of every \\boxed{...} in `text`, braces balanced (an unclosed one: the rest)."""
    out, start = [], text.find("\\boxed{")
    while start >= 0:
        depth, i = 0, start + len("\\boxed{")
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                if depth == 0:
                    out.append(text[i:j])
                    break
                depth -= 1
        else:
            out.append(text[i:])
        start = text.find("\\boxed{", start + 1)
    return out


def _hedged(answer: str, gold: str) -> bool:
    boxes = {re.sub(r"\s+", "", b) for b in boxed_contents(answer)}
    if len(boxes) > 1:
        return True
    if boxes:
        return bool(_ALTERNATIVES.search(next(iter(boxes)))) and not _ALTERNATIVES.search(gold)
    return bool(_TEXT_ALTERNATIVES.search(answer))


MAX_NESTING = 32  # brackets deeper than this are no honest answer: `((((...1))))` kept a helper busy 5 s


def _nesting(answer: str) -> int:
    depth = deepest = 0
    for ch in answer:
        if ch in "({[":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")}]":
            depth = max(0, depth - 1)
    return deepest


def _too_large(answer: str) -> bool:
    if _TOWER.search(answer) or _BIG_EXPONENT.search(answer) or _BIG_FACTORIAL.search(answer):
        return True
    if _nesting(answer) > MAX_NESTING:
        return True
    # A factorial of a bracketed group that holds a power: (10^{9})!
    for match in re.finditer(r"[)}]\s*!", answer):
        depth, i = 0, match.start()
        while i >= 0:
            depth += answer[i] in ")}"
            depth -= answer[i] in "({"
            if depth == 0:
                break
            i -= 1
        if "^" in answer[max(i, 0):match.start()]:
            return True
    return False


def _text_verdict(answer: str, gold: str) -> str | None:
    """For an answer without a boxed number, where the gold is a plain number: math-verify takes a
    number out of the text, so the text where the value goes (after the last `=`, or all of it if
    no number follows one) must hold one number and no expression."""
    if not _PLAIN_GOLD.fullmatch(gold.strip()) or any(re.search(r"\d", b) for b in boxed_contents(answer)):
        return None
    tail = answer.rsplit("=", 1)[-1]
    value = tail if re.search(r"\d", tail) else answer
    if _EXPRESSION.search(value):
        return "unevaluated"  # `The answer is 70 + 2`, `max(70, 72)`: it would read 72
    return "hedged" if len({n.replace(",", "") for n in _NUMBERS.findall(value)}) > 1 else None


def grade_math(response: str, gold: str, timeout_s: float = VERIFY_TIMEOUT_S) -> tuple[bool, str]:
    """(correct, verdict) for a response against `gold`; verdict is correct | wrong | hedged |
    unevaluated | too_large."""
    answer, gold_text = final_answer(response), normalise_gold(gold)
    if _hedged(answer, gold_text):
        return False, "hedged"
    if _too_large(answer):
        return False, "too_large"
    if (verdict := _text_verdict(answer, gold_text)) is not None:
        return False, verdict
    verdict = verify_in_helper(gold_text, answer, timeout_s)
    if verdict is None:
        return False, "too_large"
    return verdict == "correct", verdict


def math_equal(response: str, gold: str) -> bool:
    """True if the response's final answer equals `gold` (numbers, fractions, LaTeX, sets)."""
    return grade_math(response, gold)[0]
