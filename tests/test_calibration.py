"""Calibration (§6) on a tiny model with a byte tokenizer: the searched table is what a direct
StructKV run gives, the choice is the table's best, and the profile is then used by `structkv`."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ByteTokenizer

from structkv.calibration import (
    DEFAULT_COMPUTE_CAP,
    calibrate,
    calibration_prompts,
    compute_fraction,
)
from structkv.generate import decode_step, encode_prompt, generate_ids
from structkv.methods import Full, StructKV
from structkv.models import LoadedModel, tiny_model
from structkv.pivot import OnlinePivot
from structkv.profile import find_profile, resolve_method, save_profile, user_profile_path


@pytest.fixture(scope="module")
def tiny_lm():
    lm = tiny_model("tiny-llama", num_layers=10, seed=3)
    return LoadedModel(lm.model, ByteTokenizer(), "tiny-calibration-test")


@pytest.fixture(scope="module")
def profile(tiny_lm):
    return calibrate(tiny_lm, n_prompts=2, length=160, lambdas=(0.2, 0.9), steps=4)


def _direct(lm, text, pivot, lam, steps):
    """KL and teacher-forced agreement from plain prefill + decode, no calibration shortcut."""
    ids = encode_prompt(lm.tokenizer, text, chat=False)
    full = generate_ids(lm.model, ids, Full(), steps)
    out = StructKV(pivot=pivot, lam=lam).prefill(lm.model, ids, extra_capacity=steps)
    p = torch.log_softmax(Full().prefill(lm.model, ids).logits, -1)
    q = torch.log_softmax(out.logits, -1)
    kl = float((p.exp() * (p - q)).sum())
    agree = [int(out.logits.argmax()) == full.tokens[0]]
    for i in range(1, steps):
        logits = decode_step(lm.model, out.cache, full.tokens[i - 1])
        agree.append(int(logits.argmax()) == full.tokens[i])
    return kl, sum(agree) / steps


def test_table_entries_equal_direct_runs(tiny_lm, profile):
    prompts = calibration_prompts(tiny_lm.tokenizer, 2, 160)
    row = next(r for r in profile["table"] if r["rule"] == "fixed" and r["lambda"] == 0.2)
    direct = [_direct(tiny_lm, t, row["layer"], 0.2, 4) for t in prompts]
    assert row["kl"] == pytest.approx(sum(d[0] for d in direct) / 2, abs=1e-4)
    assert row["top1"] == pytest.approx(sum(d[1] for d in direct) / 2)


def test_choice_is_the_best_row_under_the_cap(profile):
    table = profile["table"]
    fixed = [r for r in table if r["rule"] == "fixed"]
    l_min, l_max = 2, profile["l_max"]
    assert sorted({r["layer"] for r in fixed}) == list(range(l_min, l_max + 1))
    assert len(table) == len(fixed) + 2 * 2  # fixed layers, then the two rules, x 2 lambdas
    # l_max is the last layer under the compute cap (or the search range's end, 7)
    assert compute_fraction(l_max, 10, 0.2) <= DEFAULT_COMPUTE_CAP + 1e-9
    assert l_max == 7 or compute_fraction(l_max + 1, 10, 0.2) > DEFAULT_COMPUTE_CAP
    best = max(table, key=lambda r: (r["top1"] - r["kl"], -r["compute_fraction"]))
    assert profile["best"]["score"] == pytest.approx(best["top1"] - best["kl"], abs=1e-4)
    for r in table:
        assert r["kl"] >= -1e-6 and 0 <= r["top1"] <= 1
        if r["rule"] == "fixed":
            assert r["compute_fraction"] == pytest.approx(
                round(compute_fraction(r["layer"], 10, 0.2), 4)
            )


def test_calibrated_profile_is_found_and_used_by_structkv(tiny_lm, profile, tmp_path, monkeypatch):
    """The calibrated profile is saved, found by model id, and its λ / pivot reach StructKV."""
    monkeypatch.setenv("STRUCTKV_CACHE", str(tmp_path))
    save_profile(profile, user_profile_path(tiny_lm.model_id))
    assert find_profile(tiny_lm.model_id) == profile
    method = resolve_method(StructKV(), tiny_lm.model_id)
    assert method.lam == profile["lambda"]
    assert method.pivot == (profile["pivot"] if profile["rule"] is None else "online")


def test_fixed_pivot_profile_drives_the_prefill(tiny_lm):
    """A profile with a fixed layer: StructKV propagates exactly there, with the profile's λ."""
    fixed = {"lambda": 0.3, "pivot": 4, "rule": None, "l_min": 2, "l_max": 7}
    method, note = StructKV().with_profile(fixed)
    assert (method.pivot, method.lam, note) == (4, 0.3, None)
    ids = encode_prompt(tiny_lm.tokenizer, "x" * 100, chat=False)
    stats = method.prefill(tiny_lm.model, ids).stats
    assert stats.pivot_layer == 4 and stats.lam == 0.3 and stats.pivot_rule == "fixed"
    assert stats.propagated_tokens == math.ceil(0.2 * 100) + 8


def test_rule_profile_drives_the_online_pivot(tiny_lm):
    """A profile with a rule: StructKV detects the pivot online with the profile's scales and
    range, and the layer it picks is the rule's on the prompt's own statistics."""
    rule = {"lambda": 0.5, "pivot": "online", "rule": "stabilised", "l_min": 2, "l_max": 7,
            "metric_scales": [1.0, 1.0, 1.0]}  # fmt: skip
    method, note = StructKV().with_profile(rule)
    assert (method.pivot, method.rule, method.scales, note) == (
        "online",
        "stabilised",
        (1.0, 1.0, 1.0),
        None,
    )
    ids = encode_prompt(tiny_lm.tokenizer, "y" * 120, chat=False)
    stats = method.prefill(tiny_lm.model, ids).stats
    metrics = list(zip(stats.entropy, stats.sparsity, stats.variance))
    online = OnlinePivot(2, 7, rule="stabilised", scales=(1.0, 1.0, 1.0))
    expected = next(
        (layer for layer, m in enumerate(metrics) if online.observe(m) is not None), None
    )
    assert stats.pivot_layer == expected and stats.pivot_rule == "stabilised"


def test_no_profile_falls_back_to_the_paper_preset_and_says_so(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTKV_CACHE", str(tmp_path))
    notes = []
    method = resolve_method(StructKV(), "no-such-model", log=notes.append)
    assert (method.pivot, method.lam) == ("online", 0.9)
    assert len(notes) == 1 and "paper preset" in notes[0] and "structkv calibrate" in notes[0]
