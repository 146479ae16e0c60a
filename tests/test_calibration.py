"""Calibration (§6) on a tiny model with a byte tokenizer: the searched table is what a direct
StructKV run gives, the choice is the table's best, and the profile is then used by `structkv`."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from conftest import ByteTokenizer

from structkv.calibration import (
    DEFAULT_COMPUTE_CAP,
    CalibrationPrompt,
    calibrate,
    calibration_prompts,
    choose_budget,
    choose_window,
    compute_fraction,
    draw_probes,
    drawn_prompts,
    echo_length,
    format_budgets,
    keep_prompts,
    matched_prefix,
)
from structkv.generate import decode_step, encode_prompt, generate_ids
from structkv.methods import Full, StructKV, StructKVPaper
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


def _used_prompts(lm, profile) -> list[CalibrationPrompt]:
    """The prompts a profile was scored on: those it selected from the ones it drew."""
    s = profile["settings"]
    parts = drawn_prompts(lm.tokenizer, s["prompts"], s["length"], s["prompt_set"])
    drawn = [prompt for _, prompts, _ in parts for prompt in prompts]
    assert len(drawn) == s["drawn"]
    return [drawn[i] for i in s["selected"]]


def _direct(lm, prompt, pivot, lam, steps):
    """KL, teacher-forced agreement and the free-running answer's agreement (its tokens up to
    the first difference from full context's, as a share), from plain prefill + generation:
    no calibration shortcut."""
    ids = prompt.encode(lm.tokenizer, chat=False)
    full = generate_ids(lm.model, ids, Full(), steps)
    method = StructKV(pivot=pivot, lam=lam)
    out = method.prefill(lm.model, ids, extra_capacity=steps)
    p = torch.log_softmax(Full().prefill(lm.model, ids).logits, -1)
    q = torch.log_softmax(out.logits, -1)
    kl = float((p.exp() * (p - q)).sum())
    agree = [int(out.logits.argmax()) == full.tokens[0]]
    for i in range(1, steps):
        logits = decode_step(lm.model, out.cache, full.tokens[i - 1])
        agree.append(int(logits.argmax()) == full.tokens[i])
    own = generate_ids(lm.model, ids, method, steps).tokens
    same = next((i for i, (a, b) in enumerate(zip(own, full.tokens)) if a != b), steps)
    return kl, sum(agree) / steps, same / steps


def test_table_entries_equal_direct_runs(tiny_lm, profile):
    prompts = _used_prompts(tiny_lm, profile)
    assert len(prompts) == 2 and all(p.prefill for p in prompts)  # copy probes
    row = next(r for r in profile["table"] if r["rule"] == "fixed" and r["lambda"] == 0.2)
    direct = [_direct(tiny_lm, t, row["layer"], 0.2, 4) for t in prompts]
    assert row["kl"] == pytest.approx(sum(d[0] for d in direct) / 2, abs=1e-4)
    assert row["top1"] == pytest.approx(sum(d[1] for d in direct) / 2)
    assert row["answer"] == pytest.approx(sum(d[2] for d in direct) / 2)


def test_mixed_probes_are_half_copy_half_question_and_score_as_direct_runs(tiny_lm):
    """Prompt set "mixed": one copy probe (two drawn) and one question probe (four drawn, from
    another seed, so another document) for two kept; the table's rows are what plain prefill
    and generation give on exactly those prompts."""
    profile = calibrate(tiny_lm, n_prompts=2, length=160, lambdas=(0.2,), steps=4,
                        prompt_set="mixed")  # fmt: skip
    s = profile["settings"]
    assert (s["prompt_set"], s["drawn"], s["objective"]) == ("mixed", 6, "answer")
    assert "answer to mixed probes" in profile["objective"]  # not the default's "copy"
    assert s["selected"][0] < 2 <= s["selected"][1]  # one from each part
    copy, question = _used_prompts(tiny_lm, profile)
    assert len(copy.prefill.split()) == 8 and not copy.echo
    assert question.echo and len(question.prefill.split()) == 3
    assert copy.text.split("\n")[0] != question.text.split("\n")[0]
    row = next(r for r in profile["table"] if r["rule"] == "fixed")
    direct = [_direct(tiny_lm, t, row["layer"], 0.2, 4) for t in (copy, question)]
    assert row["top1"] == pytest.approx(sum(d[1] for d in direct) / 2)
    assert row["answer"] == pytest.approx(sum(d[2] for d in direct) / 2)


def test_a_held_out_draw_is_other_documents_kept_as_calibration_keeps_them(tiny_lm):
    """draw_probes at the calibration seed keeps exactly the prompts calibrate scored; another
    seed draws other calibration documents (a held-out set), kept by the same rule."""
    profile = calibrate(tiny_lm, n_prompts=2, length=160, lambdas=(0.2,), steps=4,
                        prompt_set="mixed")  # fmt: skip
    s = profile["settings"]
    own = draw_probes(tiny_lm, 2, 160, "mixed", s["r_kv"], s["window"], s["pooling"], 4)
    assert (own.selected, own.drawn, own.copied) == (s["selected"], s["drawn"], s["copied"])
    assert own.texts == _used_prompts(tiny_lm, profile)
    held = draw_probes(tiny_lm, 2, 160, "mixed", s["r_kv"], s["window"], s["pooling"], 4,
                       seed=4321)  # fmt: skip
    assert held.drawn == s["drawn"] and len(held.texts) == 2
    documents = {t.text.split("\n")[0] for t in own.texts}
    assert not documents & {t.text.split("\n")[0] for t in held.texts}
    # kept as calibration keeps them: the full model's answers decide, probes it continues first
    said = []
    for run, text in zip(held.runs, held.texts):
        ids = text.encode(tiny_lm.tokenizer, chat=False)
        assert run.full_tokens == generate_ids(tiny_lm.model, ids, Full(), 4).tokens
        said.append(text.copied(tiny_lm.tokenizer.decode(run.full_tokens)))
    assert held.copied == sum(said)


def test_question_probes_score_the_answer_after_its_echo(tiny_lm, monkeypatch):
    """Question probes (v5): four drawn per prompt kept, and the answer agreement counts only
    the tokens after the answer's echo of the cue (here forced to 2 tokens, as a random model
    echoes nothing), against plain prefill + generation."""
    import structkv.calibration as calibration

    monkeypatch.setattr(calibration, "echo_length", lambda tokenizer, prompt, tokens: 2)
    grid = dict(windows=(4,), poolings=(7,), chunks=(0,), r_structs=(0.5,), r_kvs=(0.2,))
    profile = calibrate(tiny_lm, n_prompts=2, length=160, lambdas=(0.2,), steps=4,
                        prompt_set="question", compute_cap=0.75, target_fidelity=0.0,
                        budget_grid=grid)  # fmt: skip
    s = profile["settings"]
    assert (s["drawn"], s["echo_tokens"]) == (8, [2, 2])
    prompts = _used_prompts(tiny_lm, profile)
    assert all(p.echo and p.echo in p.text and p.echo not in p.prefill for p in prompts)
    differ = 0
    for row in [r for r in profile["table"] if r["rule"] == "fixed"]:
        same = []  # answer tokens up to the first difference from full context's, per prompt
        for prompt in prompts:
            ids = prompt.encode(tiny_lm.tokenizer, chat=False)
            full = generate_ids(tiny_lm.model, ids, Full(), 4).tokens
            own = generate_ids(tiny_lm.model, ids, StructKV(pivot=row["layer"], lam=0.2), 4)
            same.append(next((i for i, (a, b) in enumerate(zip(own.tokens, full)) if a != b), 4))
        assert row["answer"] == pytest.approx(sum(max(0, n - 2) / 2 for n in same) / 2)
        differ += sum(max(0, n - 2) / 2 for n in same) != pytest.approx(sum(n / 4 for n in same))
    assert differ  # the skip changes some row here, so the comparison above can fail
    # the budget search records its own runs: the same skip applies there
    row = profile["budget_search"]["chosen_row"]
    knobs = dict(r_struct=0.5, r_kv=0.2, window=4, pooling=7, chunk=0, pivot=row["pivot"],
                 lam=0.2)  # fmt: skip
    assert row["answer"] == pytest.approx(_direct_scores(tiny_lm, profile, knobs, skip=2)[3])


def test_choice_is_the_best_row_under_the_cap(profile):
    table = profile["table"]
    fixed = [r for r in table if r["rule"] == "fixed"]
    l_min, l_max = 2, profile["l_max"]
    assert sorted({r["layer"] for r in fixed}) == list(range(l_min, l_max + 1))
    assert len(table) == len(fixed) + 2 * 2  # fixed layers, then the two rules, x 2 lambdas
    assert "answer to fact probes" in profile["objective"]  # the default probes
    # l_max is the last layer under the compute cap (or the search range's end, 7)
    assert compute_fraction(l_max, 10, 0.2) <= DEFAULT_COMPUTE_CAP + 1e-9
    assert l_max == 7 or compute_fraction(l_max + 1, 10, 0.2) > DEFAULT_COMPUTE_CAP
    best = max(table, key=lambda r: (r["answer"] - r["kl"], -r["compute_fraction"]))
    assert profile["best"]["score"] == pytest.approx(best["answer"] - best["kl"], abs=1e-4)
    for r in table:
        assert r["kl"] >= -1e-6 and 0 <= r["top1"] <= 1 and 0 <= r["answer"] <= 1
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


# -- budgets: window x chunk, then R_struct x R_KV (issue 15 §3) ---------------------------------

GRID = dict(windows=(4, 8), poolings=(3, 7), chunks=(0, 4), r_structs=(0.2, 0.5), r_kvs=(0.1, 0.2))


@pytest.fixture(scope="module")
def budget_profile(tiny_lm):
    # copy probes: with them stage 1 chooses a pivot off the every-third-layer grid on this
    # tiny model, which the grid test below needs (the default fact probes choose layer 7)
    return calibrate(tiny_lm, n_prompts=2, length=160, lambdas=(0.2,), steps=4,
                     compute_cap=0.9, target_fidelity=0.0, budget_grid=GRID,
                     prompt_set="copy")  # fmt: skip


def test_budget_search_tables_cover_the_grid_under_the_cap(budget_profile):
    search = budget_profile["budget_search"]
    assert budget_profile["rule"] is None  # a fixed pivot: engines and the search need one
    assert {(r["window"], r["pooling"], r["chunk"]) for r in search["window_table"]} == {
        (w, pl, c) for w in GRID["windows"] for pl in GRID["poolings"]
        for c in GRID["chunks"]}  # fmt: skip
    # stage 2 keeps the most faithful row (ties: less KL), not agreement minus KL
    best = max(search["window_table"], key=lambda r: (r["answer"], -r["kl"]))
    chosen = budget_profile["budgets"]
    assert (chosen["window"], chosen["pooling"], chosen["chunk"]) == (
        best["window"], best["pooling"], best["chunk"])  # fmt: skip
    # the pivot is searched with the budgets: stage 1's, every third layer under the cap, and
    # per R_struct the deepest layer (up to l_max = 7) that fits the cap with it
    deepest = {max(p for p in range(2, 8) if compute_fraction(p, 10, rs) <= 0.9 + 1e-9)
               for rs in GRID["r_structs"]}  # fmt: skip
    pivots = {budget_profile["best"]["layer"], *range(2, budget_profile["l_max"] + 1, 3)}
    assert deepest - pivots, "the grid must add a pivot that every third layer misses"
    pivots |= deepest
    want = {(p, rs, rk) for p in pivots for rs in GRID["r_structs"] for rk in GRID["r_kvs"]
            if rk <= rs and compute_fraction(p, 10, rs) <= 0.9 + 1e-9}  # fmt: skip
    assert {(r["pivot"], r["r_struct"], r["r_kv"]) for r in search["budget_table"]} == want
    for r in search["budget_table"]:
        assert r["compute_fraction"] == pytest.approx(
            compute_fraction(r["pivot"], 10, r["r_struct"]), abs=1e-4
        )
    # target 0: every row meets it, so the cheapest (compute, then KV) is chosen
    cheapest = min(search["budget_table"], key=lambda r: (r["compute_fraction"], r["r_kv"]))
    assert search["met"] and search["chosen_row"] == cheapest
    assert (budget_profile["pivot"], chosen["r_struct"], chosen["r_kv"]) == (
        cheapest["pivot"], cheapest["r_struct"], cheapest["r_kv"])  # fmt: skip


def test_a_target_not_met_is_a_warning_that_says_what_to_change(budget_profile):
    """Below its target the search's ranking misled on retrieval (docs/RESULTS.md, "The capped
    calibration's own budgets"): the printed table must say so, with the cap, the best agreement
    reached and the knobs that would help; a met target prints no warning."""
    assert budget_profile["budget_search"]["met"]
    assert "warning" not in format_budgets(budget_profile)
    missed = copy.deepcopy(budget_profile)
    search = missed["budget_search"]
    search.update(met=False, target_fidelity=0.95)
    search["chosen_row"]["answer"] = 0.531
    last = format_budgets(missed).splitlines()[-1]
    assert last.startswith("warning: no setting under compute cap 0.9 reaches answer 0.95")
    assert "(best 0.531)" in last
    assert all(knob in last for knob in ("--compute-cap", "--r-kvs", "--target-fidelity"))


def _direct_scores(lm, profile, knobs, skip=0) -> tuple[float, float, float, float]:
    """Means over the profile's prompts of (KL, teacher-forced top-1, answer-step KL, answer
    agreement) from plain prefill + decode of StructKV with ``knobs``: no calibration shortcut."""
    direct = []
    for prompt in _used_prompts(lm, profile):
        ids = prompt.encode(lm.tokenizer, chat=False)
        full = Full().prefill(lm.model, ids, extra_capacity=4)
        out = StructKV(**knobs).prefill(lm.model, ids, extra_capacity=4)
        p = torch.log_softmax(full.logits, -1)
        q = torch.log_softmax(out.logits, -1)
        tokens, agree, answer_kl = [int(full.logits.argmax())], [], []
        agree.append(int(out.logits.argmax()) == tokens[0])
        for _ in range(1, 4):
            f = torch.log_softmax(decode_step(lm.model, full.cache, tokens[-1]), -1)
            c = torch.log_softmax(decode_step(lm.model, out.cache, tokens[-1]), -1)
            tokens.append(int(f.argmax()))
            agree.append(int(c.argmax()) == tokens[-1])
            answer_kl.append(float((f.exp() * (f - c)).sum()))
        own = generate_ids(lm.model, ids, StructKV(**knobs), 4).tokens
        answer = matched_prefix(own, tokens, skip)
        kl = float((p.exp() * (p - q)).sum())
        direct.append((kl, sum(agree) / 4, sum(answer_kl) / 3, answer))
    return tuple(sum(d[i] for d in direct) / len(direct) for i in range(4))


def _assert_row_is(row, scores):
    kl, top1, answer_kl, answer = scores
    assert row["kl"] == pytest.approx(kl, abs=1e-4)
    assert row["top1"] == pytest.approx(top1)
    assert row["answer"] == pytest.approx(answer)
    # the answer's KL reads the decode caches: it fails if a row used another setting's caches
    assert row["answer_kl"] == pytest.approx(answer_kl, rel=1e-3, abs=1e-5)


def test_budget_rows_equal_direct_runs(tiny_lm, budget_profile):
    """A row of the budget table (the shortcut: recorded pre-pivot caches per chunk and R_KV)
    equals plain prefill + decode of StructKV with that setting."""
    search = budget_profile["budget_search"]
    chosen = budget_profile["budgets"]
    row = max(search["budget_table"], key=lambda r: (r["r_struct"], r["r_kv"], r["pivot"]))
    knobs = dict(r_struct=row["r_struct"], r_kv=row["r_kv"], window=chosen["window"],
                 pooling=chosen["pooling"], chunk=chosen["chunk"], pivot=row["pivot"],
                 lam=budget_profile["lambda"])  # fmt: skip
    _assert_row_is(row, _direct_scores(tiny_lm, budget_profile, knobs))


@pytest.fixture(scope="module")
def faithful_profile(tiny_lm):
    """Target 1.0: the first pass's choice is its most faithful row, not the cheapest."""
    return calibrate(tiny_lm, n_prompts=2, length=160, lambdas=(0.2,), steps=4,
                     compute_cap=0.9, target_fidelity=1.0, budget_grid=GRID)  # fmt: skip


@pytest.mark.parametrize("which", ["budget_profile", "faithful_profile"])
def test_window_and_chunk_are_searched_at_the_first_pass_choice(tiny_lm, which, request):
    """Coordinate descent: pivot x budgets at the first window, pooling and chunk, then window x
    pooling x chunk at that pass's choice (not at the base budgets), then the budgets again at
    the best of those. Every window row equals a direct run at the first pass's choice."""
    profile = request.getfixturevalue(which)
    search, lam = profile["budget_search"], profile["lambda"]
    first = search["first_budget_table"]
    start = (first["window"], first["pooling"], first["chunk"])
    assert start == (GRID["windows"][0], GRID["poolings"][0], GRID["chunks"][0])
    at, _ = choose_budget(first["rows"], search["target_fidelity"])
    assert search["window_budget"] == {k: at[k] for k in ("pivot", "r_struct", "r_kv")}
    for row in search["window_table"]:
        knobs = dict(r_struct=at["r_struct"], r_kv=at["r_kv"], window=row["window"],
                     pooling=row["pooling"], chunk=row["chunk"], pivot=at["pivot"],
                     lam=lam)  # fmt: skip
        _assert_row_is(row, _direct_scores(tiny_lm, profile, knobs))
    # stage 2 keeps the most faithful row (ties: less KL), not agreement minus KL
    best = max(search["window_table"], key=lambda r: (r["answer"], -r["kl"]))
    if (best["window"], best["pooling"], best["chunk"]) == start:
        assert search["budget_table"] == first["rows"]
    row = search["chosen_row"]
    assert row in search["budget_table"]
    knobs = dict(r_struct=row["r_struct"], r_kv=row["r_kv"], window=best["window"],
                 pooling=best["pooling"], chunk=best["chunk"], pivot=row["pivot"],
                 lam=lam)  # fmt: skip
    _assert_row_is(row, _direct_scores(tiny_lm, profile, knobs))


def test_choose_window_takes_the_most_faithful_row_not_agreement_minus_kl():
    """Stage 2 ranks by the agreement the target is stated in; KL only breaks ties. Rows from
    the mixed --r-kvs 0.2 calibration (docs/results/calibration/mixed-kv02/), where agreement
    minus KL would pick window 8 (0.5735 - 0.0052) over window 64 (0.608 - 0.0882)."""
    w8 = {"window": 8, "pooling": 31, "chunk": 16, "answer": 0.5735, "kl": 0.00517}
    w64 = {"window": 64, "pooling": 31, "chunk": 8, "answer": 0.608, "kl": 0.0882}
    assert choose_window([w8, w64]) is w64
    tie = dict(w8, answer=w64["answer"])
    assert choose_window([w64, tie]) is tie  # same agreement: less KL
    assert choose_window([dict(w8, top1=0.9), dict(w64, top1=0.8)], "top1")["window"] == 8


def test_choose_budget_takes_the_cheapest_that_meets_the_target_else_the_most_faithful():
    rows = [
        {"r_struct": 0.2, "r_kv": 0.1, "answer": 0.80, "top1": 1.0, "compute_fraction": 0.6},
        {"r_struct": 0.2, "r_kv": 0.2, "answer": 0.93, "top1": 0.0, "compute_fraction": 0.6},
        {"r_struct": 0.5, "r_kv": 0.1, "answer": 0.95, "top1": 0.0, "compute_fraction": 0.75},
        {"r_struct": 0.5, "r_kv": 0.5, "answer": 0.97, "top1": 0.0, "compute_fraction": 0.75},
    ]
    assert choose_budget(rows, 0.9) == (rows[1], True)
    assert choose_budget(rows, 0.95) == (rows[2], True)
    assert choose_budget(rows, 0.99) == (rows[3], False)
    assert choose_budget(rows, 0.9, "top1") == (rows[0], True)  # older profiles' objective


def test_matched_prefix_counts_up_to_the_first_difference():
    assert matched_prefix([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert matched_prefix([1, 2, 9, 4], [1, 2, 3, 4]) == 0.5  # later agreement does not count
    assert matched_prefix([9, 2, 3, 4], [1, 2, 3, 4]) == 0.0
    # a question probe's echo of its cue is not scored, but must be reproduced
    assert matched_prefix([1, 2, 3, 4], [1, 2, 3, 4], skip=2) == 1.0
    assert matched_prefix([1, 2, 3, 9], [1, 2, 3, 4], skip=2) == 0.5
    assert matched_prefix([1, 2, 9, 4], [1, 2, 3, 4], skip=2) == 0.0
    assert matched_prefix([1, 9, 3, 4], [1, 2, 3, 4], skip=2) == 0.0


def test_echo_length_counts_the_tokens_that_repeat_the_cue():
    tok = ByteTokenizer()
    probe = CalibrationPrompt("doc", "the opening", "of it", echo="words, as quoted")
    answer = list(b" words, as quoted of it")
    assert echo_length(tok, probe, answer) == len(" words, as quoted")
    # a word cut short, another word, or no echo at all: nothing is skipped
    assert echo_length(tok, probe, list(b" words, as quote")) == 0
    assert echo_length(tok, probe, list(b" words, so quoted of it")) == 0
    assert echo_length(tok, CalibrationPrompt("doc", "a", "b"), answer) == 0


def test_probes_the_full_model_does_not_continue_are_set_aside():
    probe = CalibrationPrompt("doc", "the opening words", "of the sentence as written")
    assert probe.copied("of the sentence but then otherwise")
    assert not probe.copied("of a sentence")
    # a cued probe (3 words pre-filled): the continuation may come after the answer's echo of
    # the cue, as a run of 3 words from the sentence's next 12
    cued = CalibrationPrompt("doc", "the opening", "of the sentence as written in the document")
    assert cued.copied("words, as quoted, of the sentence but then otherwise")
    assert cued.copied("words: sentence as written")
    assert not cued.copied("the opening words of a sentence")
    assert not cued.copied("of the")
    recorded = [(0, "a", False), (1, "b", True), (2, "c", False), (3, "d", True), (4, "e", True)]
    assert [i for i, *_ in keep_prompts(recorded, 3, prefer_copied=True)] == [1, 3, 4]
    # too few continued: the others fill up, in drawing order
    assert [i for i, *_ in keep_prompts(recorded[:3], 2, prefer_copied=True)] == [0, 1]
    assert [i for i, *_ in keep_prompts(recorded, 3, prefer_copied=False)] == [0, 1, 2]


def test_profile_budgets_fill_only_the_knobs_left_unset():
    profile = {"lambda": 0.3, "pivot": 4, "rule": None, "l_min": 2, "l_max": 7,
               "budgets": {"r_struct": 0.5, "r_kv": 0.2, "window": 32, "pooling": 31,
                           "chunk": 16}}  # fmt: skip
    m, _ = StructKV().with_profile(profile)
    assert (m.r_struct, m.r_kv, m.window, m.pooling, m.chunk) == (0.5, 0.2, 32, 31, 16)
    m, _ = StructKV(window=8, r_kv=0.1, pooling=7).with_profile(profile)  # given by the user
    assert (m.r_struct, m.r_kv, m.window, m.pooling, m.chunk) == (0.5, 0.1, 8, 7, 16)
    older = {**profile, "budgets": {k: v for k, v in profile["budgets"].items() if k != "pooling"}}
    assert StructKV().with_profile(older)[0].pooling == 7  # profiles before pooling was searched
    m, _ = StructKV(pivot=5).with_profile(profile)  # a fixed pivot still takes the budgets
    assert (m.pivot, m.r_struct, m.window) == (5, 0.5, 32)
    m, _ = StructKVPaper().with_profile(profile)  # the paper preset never does
    assert (m.r_struct, m.r_kv, m.window, m.pooling, m.chunk) == (0.2, 0.1, 8, 7, 0)
    m, _ = StructKV().with_profile(None)
    assert (m.r_struct, m.r_kv, m.window, m.chunk) == (0.2, 0.1, 8, 0)
    assert StructKV().with_profile({**profile, "budgets": None})[0].window == 8


def test_calibration_prose_and_probes_are_not_the_evaluations():
    from structkv.prompts.haystack import calibration_paragraphs, stdlib_paragraphs

    calibration, evaluation = calibration_paragraphs(), stdlib_paragraphs()
    assert len(calibration) > 100 and not set(calibration) & set(evaluation)
    probes = calibration_prompts(ByteTokenizer(), 8, 2000)
    assert len(probes) == 8
    for probe in probes:
        context, request = probe.text.rsplit("\n\n", 1)
        assert request == "Quote one sentence of the text above word for word."
        # the pre-filled answer opens a sentence of the document; what follows it there is
        # what a copying model says, and it is nowhere in the request or the pre-fill
        assert len(probe.prefill.split()) == 8
        assert probe.prefill + " " + probe.continuation in context
        assert len(probe.continuation.split()) >= 8
        assert probe.continuation not in request + probe.prefill
        # from the first 60 % of the document's paragraphs
        paras = context.split("\n")
        at = next(i for i, para in enumerate(paras) if probe.prefill in para)
        assert at < max(1, int(0.6 * len(paras)))
    cued = calibration_prompts(ByteTokenizer(), 8, 2000, prompt_set="cued")
    for probe in cued:
        # v4: the sentence's first 8 words are quoted in the question (before the template's
        # closing tokens), the answer is pre-filled with only its first 3
        context, request = probe.text.rsplit("\n\n", 1)
        quote = request.removeprefix(
            'Repeat the sentence of the text above that opens with "'
        ).removesuffix('".')
        assert len(quote.split()) == 8 and probe.prefill == " ".join(quote.split()[:3])
        assert quote + " " + probe.continuation in context
    question = calibration_prompts(ByteTokenizer(), 8, 2000, prompt_set="question")
    for probe, same in zip(question, cued):
        # v5: v4's prompts, with the rest of the quote as the echo the answer is not scored on
        assert (probe.text, probe.prefill, probe.continuation) == (
            same.text, same.prefill, same.continuation)  # fmt: skip
        assert probe.prefill + " " + probe.echo + " " + probe.continuation in probe.text
        assert len(probe.echo.split()) == 5
    older = calibration_prompts(ByteTokenizer(), 8, 2000, prompt_set="probes")
    assert sum("are followed by more words" in p.text for p in older) == 6  # three in four
    for p in [*probes, *cued, *older]:
        assert "magic" not in p.text.lower() and "needle" not in p.text.lower()


def test_fact_probes_ask_for_one_inserted_code_in_words_no_evaluation_uses():
    """A fact probe inserts one invented record into the calibration prose, between paragraphs,
    and asks for its code with the answer pre-filled with the record's own words up to it (which
    the full model then continues with the code: 16 of 16 drawn at 2K); its words are not the needle
    templates', and the code is the one place the answer can come from."""
    from structkv.prompts import needle

    facts = calibration_prompts(ByteTokenizer(), 8, 2000, prompt_set="fact")
    assert len(facts) == 8 and len({p.continuation for p in facts}) == 8
    template_words = set(re.findall(r"[a-z]+", (needle.NEEDLE + needle.QUESTION).lower()))
    for probe in facts:
        context, request = probe.text.rsplit("\n\n", 1)
        code = probe.continuation
        assert code.isdigit() and 5 <= len(code) <= 8 and context.count(code) == 1
        paras = context.split("\n")
        (line,) = [para for para in paras if code in para]
        assert line.startswith("Record ") and line.endswith(f" was sealed with the code {code}.")
        name = line.split()[1]
        assert 0 < paras.index(line) < len(paras)  # never the first paragraph
        assert request == f"Which code sealed record {name} in the text above?"
        assert probe.prefill == line.removesuffix(f" {code}.") and code not in request
        own = set(re.findall(r"[a-z]+", (line + request + probe.prefill).lower())) - {name.lower()}
        assert not own & template_words - {"the", "is", "for", "in", "text", "what", "mentioned"}
        # the full model answered it only when its answer opens with the code itself
        assert "magic" not in probe.text.lower() and "needle" not in probe.text.lower()
        assert probe.copied(f" {code}.\nThe") and probe.copied(code)
        assert not probe.copied(f" {code[:-1]}.") and not probe.copied(f"code {code}")
    # another seed: other names and codes
    other = calibration_prompts(ByteTokenizer(), 8, 2000, seed=7, prompt_set="fact")
    assert not {p.continuation for p in facts} & {p.continuation for p in other}


# -- two-stage schedules: calibrate --refine (issue 15 §2-3) -------------------------------------

#: R_struct 0.5 alone exceeds cap 0.6 at every pivot searched (>= 2 of 10 layers), so every
#: stage-3 row is a first cut at 0.5 refined to 0.2 after layer 4 or 6.
REFINE_GRID = dict(windows=(4, 8), poolings=(3,), chunks=(0, 4), r_structs=(0.5,),
                   r_kvs=(0.1,), r_refines=(0.2,))  # fmt: skip


@pytest.fixture(scope="module")
def refine_profile(tiny_lm):
    return calibrate(tiny_lm, n_prompts=2, length=160, lambdas=(0.2,), steps=4,
                     compute_cap=0.6, target_fidelity=1.0, budget_grid=REFINE_GRID,
                     prompt_set="copy", refine=True)  # fmt: skip


def _two_stage_cost(pivot, refine, num_layers=10, r_struct=0.5, r_refine=0.2) -> float:
    # layers 0..pivot on all N tokens, pivot+1..refine on R_struct·N, the rest on r_refine·N
    return (pivot + 1 + (refine - pivot) * r_struct + (num_layers - 1 - refine) * r_refine) / 10


def test_refine_search_covers_the_two_stage_schedules_under_the_cap(refine_profile):
    search = refine_profile["budget_search"]
    assert refine_profile["settings"]["refine_layers"] == [4, 6]  # every second layer from 4
    pivots = {refine_profile["best"]["layer"], 2}  # stage 1's and every third layer to 4
    want = {(p, 0.5, 0.1, r, 0.2) for p in pivots for r in (4, 6)
            if p < r and _two_stage_cost(p, r) <= 0.6 + 1e-9}  # fmt: skip
    assert (
        want
        and {
            (r["pivot"], r["r_struct"], r["r_kv"], r["refine_layer"], r["r_refine"])
            for r in search["budget_table"]
        }
        == want
    )
    for r in search["budget_table"]:
        assert r["compute_fraction"] == pytest.approx(
            _two_stage_cost(r["pivot"], r["refine_layer"]), abs=1e-4
        )
        assert r["compute_fraction"] == pytest.approx(
            compute_fraction(r["pivot"], 10, 0.5, r["refine_layer"], 0.2), abs=1e-4
        )
    chosen = refine_profile["budgets"]
    row = search["chosen_row"]
    assert (chosen["refine_layer"], chosen["r_refine"]) == (row["refine_layer"], 0.2)
    lines = format_budgets(refine_profile).splitlines()
    summary = next(i for i, line in enumerate(lines) if line.startswith("budgets: "))
    assert f"refine after layer {row['refine_layer']} to 0.2" in lines[summary]
    assert "two-stage" in lines[summary + 1] and "structkv-export" in lines[summary + 1]


def test_two_stage_rows_equal_direct_runs(tiny_lm, refine_profile):
    """The shortcut (one run per first cut, each refinement branching off at its layer with the
    centrality folded so far) equals plain prefill + decode with --refine-layer/--r-refine, in
    the budget table and in the window table (searched at the first pass's two-stage choice)."""
    search, lam = refine_profile["budget_search"], refine_profile["lambda"]
    chosen = refine_profile["budgets"]
    for row in search["budget_table"]:
        knobs = dict(r_struct=0.5, r_kv=0.1, window=chosen["window"], pooling=3,
                     chunk=chosen["chunk"], pivot=row["pivot"], lam=lam,
                     refine_layer=row["refine_layer"], r_refine=0.2)  # fmt: skip
        _assert_row_is(row, _direct_scores(tiny_lm, refine_profile, knobs))
    at = search["window_budget"]
    assert at["refine_layer"] in (4, 6) and at["r_refine"] == 0.2
    for row in search["window_table"]:
        knobs = dict(r_struct=0.5, r_kv=0.1, window=row["window"], pooling=3,
                     chunk=row["chunk"], pivot=at["pivot"], lam=lam,
                     refine_layer=at["refine_layer"], r_refine=0.2)  # fmt: skip
        _assert_row_is(row, _direct_scores(tiny_lm, refine_profile, knobs))


def test_a_two_stage_profile_drives_structkv_and_the_engine(tiny_lm, refine_profile):
    chosen = refine_profile["budgets"]
    m, note = StructKV().with_profile(refine_profile)
    assert note is None
    assert (m.pivot, m.r_struct, m.refine_layer, m.r_refine) == (
        refine_profile["pivot"], 0.5, chosen["refine_layer"], 0.2)  # fmt: skip
    ids = torch.arange(40, 200) % 250
    direct = StructKV(r_struct=0.5, r_kv=0.1, window=chosen["window"], pooling=3,
                      chunk=chosen["chunk"], pivot=refine_profile["pivot"],
                      lam=refine_profile["lambda"], refine_layer=chosen["refine_layer"],
                      r_refine=0.2).prefill(tiny_lm.model, ids)  # fmt: skip
    out = m.prefill(tiny_lm.model, ids)
    assert out.stats.refine_layer == chosen["refine_layer"]
    assert torch.equal(out.logits, direct.logits)
    m.check_engine(10)  # structkv-export builds it (two more graphs; tests/test_export.py)
    # the user's own R_struct, pivot or refinement: the profile's schedule does not apply whole
    assert StructKV(r_struct=0.3).with_profile(refine_profile)[0].refine_layer is None
    assert StructKV(pivot=3).with_profile(refine_profile)[0].refine_layer is None
    own = StructKV(refine_layer=7, r_refine=0.1).with_profile(refine_profile)[0]
    assert (own.refine_layer, own.r_refine) == (7, 0.1)


def test_choose_budget_prefers_one_compaction_at_equal_cost():
    single = {"r_kv": 0.1, "answer": 0.9, "compute_fraction": 0.5}
    two = {**single, "refine_layer": 6, "r_refine": 0.2, "answer": 1.0}
    assert choose_budget([two, single], 0.9) == (single, True)
    cheaper = {**two, "compute_fraction": 0.45}
    assert choose_budget([single, cheaper], 0.9) == (cheaper, True)
