"""A byte-level BPE tokenizer built offline, with a ChatML chat template and reasoning/tool tokens.

Tiny policies need a tokenizer without a model hub. `build_tokenizer()` trains one in about a
second on text shaped like what Estuary's environments produce (arithmetic, algebra, Python,
JSON tool calls, retrieval prose) and returns a `PreTrainedTokenizerFast` that saves as
`tokenizer.json` + `tokenizer_config.json` + `chat_template.jinja`, loadable by `AutoTokenizer`.

Digits are split one per token: arithmetic then stays learnable by a tiny model.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

# Control tokens: never produced by text, skipped when decoding with skip_special_tokens.
CONTROL_TOKENS = (PAD, IM_START, IM_END)
# Markup tokens: single ids that decode visibly, so environments and budget control see them.
MARKUP_TOKENS = (
    THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE,
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the a an of to in is and what how many find compute solve answer value number total each "
    "per more less than sum product difference twice half apples books coins students train hours "
    "key needle document variable assign retrieve search lookup result return def if else for "
    "while range len list dict int str float print import True False None class self tool call "
    "calculator python question context passage special magic city name think step first then so "
    "therefore because check equation x y z n k"
).split()


def corpus(n_lines: int = 6000, seed: int = 0) -> Iterator[str]:
    """Lines resembling environment prompts and answers (no external data)."""
    rng = random.Random(seed)
    makers = (_arith, _algebra, _word, _python, _tool, _prose)
    for _ in range(n_lines):
        yield rng.choice(makers)(rng)


def _arith(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(1, 99)
    op = rng.choice("+-*/")
    return f"Compute {a} {op} {b}. {THINK_OPEN}{a} {op} {b} = ?{THINK_CLOSE} The answer is \\boxed{{{a}}}."


def _algebra(rng: random.Random) -> str:
    a, x, b = rng.randint(2, 9), rng.randint(-20, 20), rng.randint(-50, 50)
    return f"Solve for x: {a}x + {b} = {a * x + b}. So x = {x}. Answer: $\\frac{{{x}}}{{1}}$"


def _word(rng: random.Random) -> str:
    n = rng.randint(2, 60)
    return f"Tom has {n} apples and buys {n + 3} more. How many apples does he have? #### {2 * n + 3}"


def _python(rng: random.Random) -> str:
    name = rng.choice(["add", "square", "count_even", "reverse", "max_of", "is_prime"])
    return (
        f"```python\ndef {name}(xs):\n    total = 0\n    for x in xs:\n        if x % 2 == 0:\n"
        f"            total += x\n    return total\n```\nassert {name}([1, 2, 3]) == {rng.randint(0, 9)}"
    )


def _tool(rng: random.Random) -> str:
    expr = f"{rng.randint(1, 99)} * {rng.randint(1, 99)}"
    return (
        f'{TOOL_CALL_OPEN}{{"name": "calculator", "arguments": {{"expression": "{expr}"}}}}'
        f"{TOOL_CALL_CLOSE}\n{TOOL_RESPONSE_OPEN}{rng.randint(1, 9801)}{TOOL_RESPONSE_CLOSE}"
    )


def _prose(rng: random.Random) -> str:
    words = rng.choices(_WORDS, k=rng.randint(8, 30))
    return " ".join(words).capitalize() + rng.choice([".", "?", ":", "!"])


def build_tokenizer(vocab_size: int = 2048, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE and wrap it with the chat template and special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CONTROL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in MARKUP_TOKENS])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    return wrapped
