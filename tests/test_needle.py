"""Needle prompts: deterministic, sized in model tokens, needle present once, scored by match."""

from __future__ import annotations

import pytest

from structkv.generate import encode_prompt
from structkv.prompts.needle import make_needle_prompt, needle_token_positions, score_contains

pytestmark = pytest.mark.real_model


@pytest.mark.parametrize("haystack", ["prose", "noise"])
@pytest.mark.parametrize("length", [1024, 2048])
def test_needle_prompt_shape(smollm2, haystack, length):
    tok = smollm2.tokenizer
    a = make_needle_prompt(tok, length, 0.5, seed=4, haystack=haystack)
    b = make_needle_prompt(tok, length, 0.5, seed=4, haystack=haystack)
    assert a.prompt == b.prompt  # same seed, same bytes
    assert a.prompt.count(a.answer) == 1 and a.prompt.count(a.key) == 2  # needle + question
    assert a.prompt.rstrip().endswith("mentioned in the provided text?")  # question last
    n = len(tok(a.prompt, add_special_tokens=False)["input_ids"])
    assert abs(n - length) <= 0.03 * length
    ids = encode_prompt(tok, a.prompt, chat=True).tolist()
    where = needle_token_positions(tok, ids, a.answer)
    assert len(where) == 7  # SmolLM2 tokenizes every digit on its own
    assert 0.3 < where[0] / len(ids) < 0.7
    assert make_needle_prompt(tok, length, 0.5, seed=5, haystack=haystack).prompt != a.prompt


def test_scoring():
    assert score_contains("1234567", "The number is 1234567.") == 1.0
    assert score_contains("1234567", "The number is 123456.") == 0.0
