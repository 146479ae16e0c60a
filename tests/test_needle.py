"""Needle prompts: deterministic, sized in model tokens, needle present once, scored by match."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from structkv.generate import encode_prompt
from structkv.prompts.needle import (
    check_templates,
    make_needle_prompt,
    needle_token_positions,
    score_contains,
)

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


def test_own_wording_and_haystack_file(smollm2, tmp_path):
    """Held-out checks: the wording and haystack given are the ones in the prompt, and nothing of
    the default wording or prose is left in it."""
    tok = smollm2.tokenizer
    text = "\n\n".join(
        f"Clause {i}. The licensee shall keep the ledger of parcel {i} in good order." * 3
        for i in range(40)
    )
    (tmp_path / "hay.txt").write_text(text)
    a = make_needle_prompt(
        tok,
        1024,
        0.25,
        seed=2,
        haystack_file=str(tmp_path / "hay.txt"),
        needle="Remember: the locker code of {key} reads {value}.",
        question="Which locker code does {key} have?",
    )
    default = make_needle_prompt(tok, 1024, 0.25, seed=2)
    assert a.answer == default.answer and a.key == default.key  # same seed, same needle facts
    assert f"the locker code of {a.key} reads {a.answer}." in a.prompt
    assert a.prompt.rstrip().endswith(f"Which locker code does {a.key} have?")
    assert "special magic number" not in a.prompt
    assert "licensee shall keep the ledger" in a.prompt
    assert a.prompt.count(a.answer) == 1
    n = len(tok(a.prompt, add_special_tokens=False)["input_ids"])
    assert abs(n - 1024) <= 0.03 * 1024


@pytest.mark.parametrize(
    "needle, question, words",
    [
        ("The code for {key} is secret.", "What is the code for {key}?", "lacks {value}"),
        ("The code is {value}.", "What is the code?", "lacks {key}"),
        ("The code for {key} is {value}.", "Is it {value}?", "must not contain {value}"),
        ("The {kind} code for {key} is {value}.", "What is {key}?", "placeholder other than"),
    ],
)
def test_bad_wording_is_refused(needle, question, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        check_templates(needle, question)


def test_eval_needles_refuses_bad_input_before_loading():
    """Exit 2 with one line naming the fix, no traceback, no model load (fast)."""
    script = Path(__file__).parents[1] / "scripts" / "eval_needles.py"
    for extra, words in (
        (["--needle", "The code is {value}."], "lacks {key}"),
        (["--haystack-file", "/nonexistent/hay.txt"], "No such file"),
        (["--haystack", "noise", "--haystack-file", str(script)], "drop --haystack noise"),
        (["--methods", "full,nosuch"], "unknown method"),
    ):
        r = subprocess.run(
            [sys.executable, str(script), *extra], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 2, (extra, r.stderr)
        assert words in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
