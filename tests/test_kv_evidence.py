"""StructKV's ``kv_evidence``: the caches of the layers before the pivot chosen after the last
layer, by their own saliency plus deeper evidence (issue 15 §2)."""

from __future__ import annotations

import pytest
import torch

from structkv.centrality import accumulate
from structkv.errors import StructKVError
from structkv.generate import generate_ids
from structkv.methods import StructKV, get_method
from structkv.models import tiny_model
from structkv.selection import budget, select_tokens

PIVOT, N = 3, 300


@pytest.fixture(scope="module")
def lm():
    return tiny_model("tiny-llama", num_layers=8, seed=1)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (N,), generator=torch.Generator().manual_seed(0))


def _kept(result, layer):
    return result.cache.layers[layer].kept_positions()


def test_a_vanishing_weight_keeps_each_layers_own_choice(lm, ids):
    """β → 0 goes through the deferral (K/V held, chosen after the last layer) and must give
    exactly the caches of the immediate per-layer choice: the plumbing loses nothing."""
    base = StructKV(pivot=PIVOT, lam=0.5).prefill(lm.model, ids, extra_capacity=4)
    tiny = StructKV(pivot=PIVOT, lam=0.5, kv_evidence=1e-9).prefill(lm.model, ids, 4)
    for layer in range(8):
        assert torch.equal(_kept(base, layer), _kept(tiny, layer))
        assert torch.equal(base.cache.layers[layer].keys(), tiny.cache.layers[layer].keys())
    assert torch.equal(base.logits, tiny.logits)


def test_a_dominant_weight_keeps_what_the_deeper_evidence_points_at(lm, ids):
    """β huge: every layer before the pivot keeps, in every KV head, the top of the evidence —
    the centrality at the pivot plus the attention the later layers pay each propagated token
    (recomputed here from the layer views with the public centrality function)."""
    views = []
    method = StructKV(pivot=PIVOT, lam=0.5, kv_evidence=1e6)
    out = method.prefill(lm.model, ids, extra_capacity=4, observer=views.append)
    c = None
    for view in views[: PIVOT + 1]:
        c = accumulate(c, view.saliency, 0.5)
    deep = torch.zeros(N)
    for view in views[PIVOT + 1 :]:
        deep[view.positions] += view.saliency.float()
    cut = N - method.window

    def share(x):
        return x / x[:cut].sum()

    want = select_tokens(share(c.float()) + share(deep), budget(0.1, N), 8, 7, "max")
    for layer in range(PIVOT + 1):
        kept = _kept(out, layer)
        for head in range(kept.shape[0]):
            assert torch.equal(kept[head], want)
    # the layers after the pivot choose as before; the prefill's own logits do not change
    base = StructKV(pivot=PIVOT, lam=0.5).prefill(lm.model, ids, extra_capacity=4)
    for layer in range(PIVOT + 1, 8):
        assert torch.equal(_kept(out, layer), _kept(base, layer))
    assert torch.equal(out.logits, base.logits)


def test_generation_with_evidence_decodes_from_complete_caches(lm, ids):
    gen = generate_ids(lm.model, ids, StructKV(pivot=PIVOT, lam=0.5, kv_evidence=1.0), 6)
    assert len(gen.tokens) == 6


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True, "1"])
def test_bad_weights_are_refused_with_the_knob_named(bad):
    with pytest.raises(StructKVError, match="kv_evidence"):
        get_method("structkv", kv_evidence=bad)


def test_engines_refuse_evidence():
    with pytest.raises(StructKVError, match="--kv-evidence"):
        StructKV(kv_evidence=1.0).check_engine()
