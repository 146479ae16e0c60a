"""Needle-in-a-haystack prompts sized in the model's own tokens, deterministic from a seed.

The question comes after the context, inside the user turn (as in the paper's LongBench/RULER
runs); scoring is whether the needle's value appears in the answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from structkv.prompts.haystack import paragraphs

_WORDS = (
    "amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo",
    "juniper", "kelp", "lagoon", "meadow", "nectar", "onyx", "prairie", "quartz", "river",
    "saffron", "tundra", "umber", "violet", "willow", "yarrow", "zephyr",
)  # fmt: skip

#: RULER's noise haystack (niah_single_1): repeated filler that the needle stands out from.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACKS = ("noise", "prose")

QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
NEEDLE = "The special magic number for {key} is: {value}."


@dataclass
class NeedlePrompt:
    prompt: str
    answer: str
    key: str
    depth: float
    seed: int


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_context(
    tokenizer, n_tokens: int, rng: random.Random, source: tuple[str, ...]
) -> list[str]:
    """Consecutive paragraphs from a random start, trimmed by words to about ``n_tokens``."""
    start = rng.randrange(len(source))
    out, used, i = [], 0, start
    while used < n_tokens:
        para = source[i % len(source)]
        cost = _count(tokenizer, para) + 1
        if used + cost > n_tokens:
            words = para.split()
            keep = max(1, int(len(words) * (n_tokens - used) / cost))
            para = " ".join(words[:keep])
            cost = _count(tokenizer, para) + 1
        out.append(para)
        used += cost
        i += 1
    return out


def check_templates(needle: str, question: str) -> None:
    """Refuse needle/question wordings that cannot make a scorable prompt, naming the fix.

    Why: held-out checks bring their own wording (``scripts/eval_needles.py --needle
    --question``); a template without ``{value}`` would hide the answer and score 0 silently."""
    problems = []
    for name, text, need, forbid in (
        ("needle", needle, ("{key}", "{value}"), ()),
        ("question", question, ("{key}",), ("{value}",)),
    ):
        problems += [f"the {name} wording lacks {p}" for p in need if p not in text]
        problems += [f"the {name} wording must not contain {p}" for p in forbid if p in text]
    if problems:
        raise ValueError(
            "; ".join(problems) + ": write e.g. --needle 'The code for {key} is {value}.' "
            "--question 'What is the code for {key}?'"
        )
    try:
        needle.format(key="k", value="v"), question.format(key="k")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"needle/question wording has a placeholder other than {{key}} and {{value}} ({e}); "
            "double the braces ({{ }}) to write a literal one"
        ) from None


def make_needle_prompt(
    tokenizer,
    length: int,
    depth: float,
    seed: int,
    haystack: str = "prose",
    haystack_file: str | None = None,
    needle: str = NEEDLE,
    question: str = QUESTION,
) -> NeedlePrompt:
    """A prompt of about ``length`` tokens (chat wrapper excluded) with one needle at ``depth``.

    ``haystack``: "prose" (stdlib docstrings or ``haystack_file``) or "noise" (RULER filler).
    ``needle`` / ``question``: the wording, with ``{key}`` and ``{value}`` (question: ``{key}``)
    placeholders — RULER's by default, other wordings for held-out checks."""
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; choose one of {HAYSTACKS}")
    check_templates(needle, question)
    rng = random.Random(seed)
    key = f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}"
    value = str(rng.randrange(1_000_000, 10_000_000))
    needle = needle.format(key=key, value=value)
    question = question.format(key=key)
    overhead = _count(tokenizer, needle) + _count(tokenizer, question) + 4
    source = (NOISE,) if haystack == "noise" else paragraphs(haystack_file)
    context = build_context(tokenizer, length - overhead, rng, source)
    where = min(len(context), max(0, round(depth * len(context))))
    context.insert(where, needle)
    prompt = "\n".join(context) + "\n\n" + question
    return NeedlePrompt(prompt, value, key, depth, seed)


def score_contains(answer: str, output: str) -> float:
    """1.0 when the expected value appears in the model's output (RULER's string match)."""
    return float(answer in output)


def needle_token_positions(tokenizer, input_ids: list[int], answer: str) -> list[int]:
    """Positions of the needle value's tokens in ``input_ids`` (one token per digit here)."""
    target = tokenizer(answer, add_special_tokens=False)["input_ids"]
    for i in range(len(input_ids) - len(target) + 1):
        if input_ids[i : i + len(target)] == target:
            return list(range(i, i + len(target)))
    return []
