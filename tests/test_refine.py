"""StructKV's ``refine_layer`` / ``r_refine`` (issue 15 §2, budgets that shrink with depth): a
second compaction past the pivot, checked against the brute-force float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import torch

from structkv.errors import StructKVError
from structkv.generate import generate_ids
from structkv.knobs import Parser, add_method_args, method_knobs
from structkv.methods import StructKV

N, W = 64, 8
PIVOT, REFINE, LAM, R_STRUCT, R_REFINE, R_KV = 1, 3, 0.5, 0.5, 0.25, 0.125


def _ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (N,), generator=torch.Generator().manual_seed(seed))


def _method(**over) -> StructKV:
    knobs = dict(
        r_struct=R_STRUCT, r_kv=R_KV, lam=LAM, pivot=PIVOT, refine_layer=REFINE,
        r_refine=R_REFINE, pooling=1, window=W,
    )  # fmt: skip
    return StructKV(**{**knobs, **over})


def _reference(model, ids):
    """Positions after each layer and last-token logits by brute force: C over the whole
    prompt up to the pivot, then C decays everywhere and grows only where tokens are present."""
    g = model.config.num_key_value_heads

    def centrality(attns, pos, upto):
        c = np.zeros(N)
        for layer in range(upto + 1):
            c = LAM * c
            c[pos[layer].numpy()] += ref.saliency_from_attention(attns[layer], g, W).sum(0)
        return c

    def cut(layer, ratio):
        def keep(attns, pos):
            scores = centrality(attns, pos, layer)[pos[layer].numpy()]
            return ref.topk_window(scores, math.ceil(ratio * N - 1e-9), W)

        return keep

    cuts = {PIVOT: cut(PIVOT, R_STRUCT), REFINE: cut(REFINE, R_REFINE)}
    _, pos, logits = ref.layer_by_layer(ref.to_float64_eager(model), ids, cuts=cuts)
    return [p.tolist() for p in pos], logits


def test_refinement_keeps_the_top_of_the_continued_centrality(tiny):
    ids = _ids()
    views = []
    out = _method().prefill(tiny.model, ids, observer=views.append)
    positions, logits = _reference(tiny.model, ids)
    assert [v.positions.tolist() for v in views] == positions
    assert out.stats.refine_layer == REFINE
    assert out.stats.refined_tokens == math.ceil(R_REFINE * N) + W
    assert set(positions[REFINE + 1]) < set(positions[PIVOT + 1])
    assert positions[-1][-W:] == list(range(N - W, N))  # the window survives both cuts
    torch.testing.assert_close(out.logits.double(), logits, atol=1e-4, rtol=1e-4)
    for layer, cache in enumerate(out.cache.layers):  # each cache holds tokens still present
        for head in cache.kept_positions().tolist():
            assert set(head) <= set(positions[layer])


def test_compute_fraction_counts_the_tokens_each_layer_ran(tiny):
    out = _method().prefill(tiny.model, _ids())
    layers = len(tiny.model.model.layers)
    propagated, refined = math.ceil(R_STRUCT * N) + W, math.ceil(R_REFINE * N) + W
    run = (PIVOT + 1) * N + (REFINE - PIVOT) * propagated + (layers - REFINE - 1) * refined
    assert out.stats.compute_fraction == pytest.approx(run / (layers * N))
    plain = _method(refine_layer=None, r_refine=None).prefill(tiny.model, _ids())
    assert out.stats.compute_fraction < plain.stats.compute_fraction
    assert plain.stats.refine_layer is None


def test_a_refinement_at_the_last_layer_changes_nothing(tiny):
    """Nothing runs after the last layer, so a refinement there is never made."""
    last = len(tiny.model.model.layers) - 1
    ids = _ids(seed=4)
    refined = _method(refine_layer=last).prefill(tiny.model, ids)
    plain = _method(refine_layer=None, r_refine=None).prefill(tiny.model, ids)
    assert refined.stats.refine_layer is None
    assert torch.equal(refined.logits, plain.logits)


def test_generation_decodes_from_the_refined_caches(tiny):
    gen = generate_ids(tiny.model, _ids(), _method(), 5)
    assert len(gen.tokens) == 5


@pytest.mark.parametrize(
    "over,match",
    [
        ({"r_refine": None}, "go together"),
        ({"refine_layer": None}, "go together"),
        ({"r_refine": 0.5}, "smaller than --r-struct"),
        ({"refine_layer": PIVOT}, "after the pivot"),
        ({"refine_layer": -1}, "refine_layer must be"),
        ({"r_refine": 0.0}, "r_refine must be in"),
    ],
)
def test_bad_refinements_are_refused_with_the_knob_named(over, match):
    with pytest.raises(StructKVError, match=match):
        _method(**over).check_knobs()


@pytest.mark.parametrize(
    "over,layers,match",
    [
        ({"r_kv": 0.3}, None, "must not exceed --r-refine"),  # the paged cache's equal counts
        ({"refine_layer": 9}, 10, r"--refine-layer must be in \[2, 8\]"),  # no layer after it
    ],
)
def test_engines_refuse_what_the_paged_cache_cannot_hold(over, layers, match):
    _method().check_engine(10)  # the test's own schedule exports
    with pytest.raises(StructKVError, match=match):
        _method(**over).check_engine(layers)


def test_the_flags_reach_the_method():
    parser = Parser(prog="t")
    add_method_args(parser)
    knobs = method_knobs(parser.parse_args(["--refine-layer", "14", "--r-refine", "0.1"]))
    assert knobs == {"refine_layer": 14, "r_refine": 0.1}
