"""Math answer equivalence with math-verify, safe in threads and async actors.

math-verify guards its sympy work with `signal.alarm`, which only works in the main thread; here
its timeouts are off and inputs are bounded instead (the last `MAX_CHARS` of a response, which
is where the final answer is), so pathological expressions stay cheap.
"""

from __future__ import annotations

import logging
import re

from math_verify import parse, verify

MAX_CHARS = 2000
logging.getLogger("math_verify").setLevel(logging.ERROR)

_GSM_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def normalise_gold(answer: str) -> str:
    """GSM8K gold answers end with `#### 42`; MATH ones are LaTeX, maybe inside \\boxed{}."""
    match = _GSM_ANSWER.search(answer)
    text = match.group(1).replace(",", "") if match else answer.strip()
    return text if text.startswith("$") or "\\boxed" in text else f"${text}$"


def final_answer(response: str) -> str:
    """The part of a response after the thinking (the whole of it if there is no </think>)."""
    return response.rsplit("</think>", 1)[-1][-MAX_CHARS:]


def math_equal(response: str, gold: str) -> bool:
    """True if the response's final answer equals `gold` (numbers, fractions, LaTeX, sets)."""
    try:
        gold_parsed = parse(normalise_gold(gold), parsing_timeout=None)
        pred_parsed = parse(final_answer(response), parsing_timeout=None)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except Exception:  # noqa: BLE001 - a parse failure of model output is a wrong answer
        return False
