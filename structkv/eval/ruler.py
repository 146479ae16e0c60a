"""RULER-style synthetic tasks, sized in the model's own tokens and deterministic from a seed.

Tasks follow RULER's definitions (Hsieh et al., 2024) with our own text: needle retrieval
(single / multi-key / multi-value / multi-query), variable tracking (``vt``), common-words
(``cwe``) and frequent-words (``fwe``) extraction. The question always follows the context
inside the user turn. Haystacks are built at run time (:mod:`structkv.prompts.haystack`), never
stored in the repository. Scoring is RULER's: ``all`` = mean over references of "reference
appears in the output" (case-insensitive), ``part`` = 1 if any reference appears.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from structkv.prompts.haystack import paragraphs
from structkv.prompts.needle import NOISE


@dataclass
class Sample:
    task: str
    prompt: str
    answers: list[str]
    length: int
    seed: int
    depth: float | None = None
    metric: str = "all"


def score(sample: Sample, output: str) -> float:
    """RULER's string match: ``all`` averages over references, ``part`` takes any."""
    out = output.lower()
    hits = [a.lower() in out for a in sample.answers]
    if sample.metric == "part":
        return float(any(hits))
    return sum(hits) / len(hits)


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@cache
def vocabulary(haystack_file: str | None = None) -> tuple[str, ...]:
    """Lower-case words of 4-10 letters from the prose pool, sorted (deterministic)."""
    words = set()
    for para in paragraphs(haystack_file):
        words.update(w.lower() for w in re.findall(r"\b[A-Za-z]{4,10}\b", para))
    return tuple(sorted(words))


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _fill(tokenizer, budget: int, units: list[str], sep: str = "\n") -> list[str]:
    """Take units in order (cycling) until ``budget`` tokens when joined with ``sep``; the
    last unit is trimmed by words. A unit's cost is counted with its separator in front,
    since BPE merges a leading space into the word."""
    out, used, i = [], 0, 0
    while used < budget and units:
        unit = units[i % len(units)]
        cost = count_tokens(tokenizer, sep + unit)
        if used + cost > budget:
            words = unit.split()
            keep = int(len(words) * (budget - used) / cost)
            if keep < 1:
                break
            unit = " ".join(words[:keep])
            cost = count_tokens(tokenizer, sep + unit)
        out.append(unit)
        used += cost
        i += 1
    return out


def _insert(units: list[str], items: list[str], depths: list[float]) -> list[str]:
    """Insert each item at the unit boundary nearest its depth (fraction of the context)."""
    out = list(units)
    for item, depth in sorted(zip(items, depths), key=lambda p: -p[1]):
        out.insert(min(len(out), max(0, round(depth * len(units)))), item)
    return out


def _haystack_units(kind: str, rng: random.Random, haystack_file: str | None) -> list[str]:
    if kind == "noise":
        return [NOISE]
    source = paragraphs(haystack_file)
    start = rng.randrange(len(source))
    return [source[(start + i) % len(source)] for i in range(len(source))]


def _niah(
    tokenizer,
    length: int,
    rng: random.Random,
    haystack: str,
    value_kind: str,
    n_keys: int = 1,
    n_values: int = 1,
    n_queries: int = 1,
    key_kind: str = "word",
    haystack_file: str | None = None,
    depth: float | None = None,
) -> tuple[str, list[str], float]:
    """RULER's needle tasks. ``haystack`` is noise, prose, or needles (the haystack is made of
    other needles, as in multikey_2/3)."""
    vocab = vocabulary(haystack_file)
    make_value = _number if value_kind == "number" else _uuid

    def make_key():
        return _uuid(rng) if key_kind == "uuid" else f"{rng.choice(vocab)}-{rng.choice(vocab)}"

    keys = []
    while len(keys) < n_keys:
        key = make_key()
        if key not in keys:
            keys.append(key)
    noun = "number" if value_kind == "number" else "uuid"
    needles, answers = [], []
    for i, key in enumerate(keys):
        for _ in range(n_values if i == 0 else 1):
            value = make_value(rng)
            needles.append(f"One of the special magic {noun}s for {key} is: {value}.")
            if i < n_queries or (i == 0 and n_values > 1):
                answers.append(value)
    rng.shuffle(needles)
    queried = keys[:n_queries]
    keys_text = ", ".join(queried[:-1]) + (" and " if len(queried) > 1 else "") + queried[-1]
    question = (
        f"What are all the special magic {noun}s for {keys_text} mentioned in the provided text?"
        if n_values > 1 or n_queries > 1
        else f"What is the special magic {noun} for {keys_text} mentioned in the provided text?"
    )
    overhead = sum(count_tokens(tokenizer, n) + 1 for n in needles)
    overhead += count_tokens(tokenizer, question) + 2
    if haystack == "needles":
        units = []
        for _ in range(4 * length // 20):
            k = make_key()
            units.append(f"One of the special magic {noun}s for {k} is: {make_value(rng)}.")
    else:
        units = _haystack_units(haystack, rng, haystack_file)
    context = _fill(tokenizer, length - overhead, units)
    depths = [rng.random() for _ in needles]
    if len(needles) == 1:
        depths = [depth if depth is not None else rng.choice([0.1, 0.25, 0.5, 0.75, 0.9])]
    body = _insert(context, needles, depths)
    return "\n".join(body) + "\n\n" + question, answers, depths[0]


def _vt(tokenizer, length, rng, haystack_file=None, depth=None, hops: int = 4):
    """Variable tracking: one chain X1 = value, X2 = X1, ...; name every variable of it."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(letters) for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randrange(10_000, 100_000))
    chain = [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))
    ]
    question = (
        f"Find all variables that are assigned the value {value} in the text above, "
        f"directly or through other variables."
    )
    overhead = sum(count_tokens(tokenizer, c) + 1 for c in chain) + count_tokens(
        tokenizer, question
    )
    context = _fill(tokenizer, length - overhead - 2, [NOISE])
    depths = sorted(rng.random() for _ in chain)
    body = list(context)
    # Insert in chain order so each assignment comes after the one it refers to.
    for c, d in sorted(zip(chain, depths), key=lambda p: -p[1]):
        body.insert(round(d * len(context)), c)
    return "\n".join(body) + "\n\n" + question, names, None


def _cwe(tokenizer, length, rng, haystack_file=None, depth=None, n_common: int = 10):
    """Common words: ``n_common`` words appear 30 times, the rest 3 times; name the common."""
    vocab = list(vocabulary(haystack_file))
    rng.shuffle(vocab)
    common, rare = vocab[:n_common], vocab[n_common:]
    question = f"What are the {n_common} most common words in the above list?"
    per_word = count_tokens(tokenizer, " 123. " + common[0]) + 1
    budget = length - count_tokens(tokenizer, question) - 4
    n_rare = max(0, (budget // per_word - 30 * n_common) // 3)
    words = common * 30 + rare[:n_rare] * 3
    rng.shuffle(words)
    items = [f"{i + 1}. {w}" for i, w in enumerate(words)]
    text = " ".join(_fill(tokenizer, budget, items, sep=" "))
    return "Below is a numbered list of words.\n" + text + "\n\n" + question, common, None


def _fwe(tokenizer, length, rng, haystack_file=None, depth=None, alpha: float = 2.0):
    """Frequent words: coded words drawn from a Zipf(alpha) law; name the three most frequent."""
    vocab = list(vocabulary(haystack_file))
    rng.shuffle(vocab)
    coded = vocab[:200]
    weights = [1 / (r + 1) ** alpha for r in range(len(coded))]
    question = "What are the 3 most frequently appeared coded words in the above coded text?"
    budget = length - count_tokens(tokenizer, question) - 4
    words = rng.choices(coded, weights=weights, k=max(10, budget))
    text = " ".join(_fill(tokenizer, budget, words, sep=" "))
    counts = {w: text.split().count(w) for w in coded[:4]}
    top = sorted(counts, key=lambda w: -counts[w])[:3]
    head = "Read the following coded text and track the frequency of each coded word.\n"
    return head + text + "\n\n" + question, top, None


def _task(fn: Callable, **kw) -> Callable:
    return lambda tok, length, rng, hf, depth: fn(
        tok, length, rng, haystack_file=hf, depth=depth, **kw
    )


TASKS: dict[str, Callable] = {
    "niah_single_1": _task(_niah, haystack="noise", value_kind="number"),
    "niah_single_2": _task(_niah, haystack="prose", value_kind="number"),
    "niah_single_3": _task(_niah, haystack="prose", value_kind="uuid"),
    "niah_multikey_1": _task(_niah, haystack="prose", value_kind="number", n_keys=4),
    "niah_multikey_2": _task(_niah, haystack="needles", value_kind="number"),
    "niah_multikey_3": _task(_niah, haystack="needles", value_kind="uuid", key_kind="uuid"),
    "niah_multivalue": _task(_niah, haystack="prose", value_kind="number", n_values=4),
    "niah_multiquery": _task(_niah, haystack="prose", value_kind="number", n_keys=4, n_queries=4),
    "vt": _task(_vt),
    "cwe": _task(_cwe),
    "fwe": _task(_fwe),
}


def make_sample(
    task: str,
    tokenizer,
    length: int,
    seed: int,
    haystack_file: str | None = None,
    depth: float | None = None,
) -> Sample:
    """One deterministic sample of ``task`` with a user prompt of about ``length`` tokens.

    ``depth`` (0..1) places the needle of single-needle tasks; default: drawn from the seed."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{length}:{seed}:{depth}")
    prompt, answers, where = TASKS[task](tokenizer, length, rng, haystack_file, depth)
    return Sample(task, prompt, answers, length, seed, where)
