"""RULER-style generators: deterministic, sized in model tokens, answers present, scoring."""

from __future__ import annotations

import pytest

from structkv.eval.ruler import TASKS, Sample, count_tokens, make_sample, score

pytestmark = pytest.mark.real_model


@pytest.mark.parametrize("task", list(TASKS))
def test_generator_contract(smollm2, task):
    tok = smollm2.tokenizer
    a = make_sample(task, tok, 1024, seed=3)
    assert a == make_sample(task, tok, 1024, seed=3)  # same seed -> identical
    assert a.prompt != make_sample(task, tok, 1024, seed=4).prompt
    n = count_tokens(tok, a.prompt)
    assert abs(n - 1024) <= 0.02 * 1024, n
    assert a.answers and all(ans in a.prompt for ans in a.answers)
    assert a.prompt.rstrip().endswith("?") or a.prompt.rstrip().endswith(".")
    if task.startswith("niah"):
        for ans in a.answers:  # every value is stated exactly once
            assert a.prompt.count(ans) == 1


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_single_needle_depth(smollm2, depth):
    tok = smollm2.tokenizer
    s = make_sample("niah_single_2", tok, 2048, seed=1, depth=depth)
    where = s.prompt.index(s.answers[0])
    before = count_tokens(tok, s.prompt[:where])
    assert abs(before / 2048 - depth) < 0.06


def test_vt_chain_is_in_order(smollm2):
    s = make_sample("vt", smollm2.tokenizer, 1024, seed=2)
    first = f"VAR {s.answers[0]} = "
    assert s.prompt.index(first) < min(s.prompt.index(f"VAR {v} = VAR") for v in s.answers[1:])
    for prev, name in zip(s.answers, s.answers[1:]):
        assert s.prompt.index(f"VAR {prev} =") < s.prompt.index(f"VAR {name} = VAR {prev}.")


def test_cwe_common_words_are_most_common(smollm2):
    s = make_sample("cwe", smollm2.tokenizer, 2048, seed=0)
    words = [w for w in s.prompt.split() if w.isalpha() and w.islower()]
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts, key=lambda w: -counts[w])[: len(s.answers)]
    assert set(top) == set(s.answers)


def test_scoring_by_hand():
    s = Sample("x", "", ["ab12", "CD34"], 0, 0)
    assert score(s, "I found AB12 and cd34.") == 1.0
    assert score(s, "only ab12") == 0.5
    assert score(s, "nothing") == 0.0
    part = Sample("x", "", ["ab12", "cd34"], 0, 0, metric="part")
    assert score(part, "cd34") == 1.0 and score(part, "none") == 0.0
