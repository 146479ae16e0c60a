"""§1–§5 against the brute-force float64 reference in ``reference.py``.

Top-k sets, window inclusion, sorted order and original positions are asserted exactly;
scores and logits to float32 precision.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import torch

from structkv.centrality import Centrality
from structkv.layers import head_dims, prefill_layer, rope
from structkv.methods import FastKV, GemFilter, SnapKV, StructKV
from structkv.pivot import attention_metrics
from structkv.saliency import saliency_per_head, window_attention

N, W = 64, 8


def _ids(seed: int = 3, n: int = N) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_saliency_and_metrics_match_reference(tiny):
    model = tiny.model
    _, g, _ = head_dims(model)
    ids = _ids()
    attns, _, _ = ref.layer_by_layer(ref.to_float64_eager(model), ids)
    positions = torch.arange(N)
    h = model.model.embed_tokens(ids[None])
    cos, sin = rope(model, positions, h.dtype)
    for layer_idx, layer in enumerate(model.model.layers):
        h, q, k, _ = prefill_layer(layer, h, positions, cos, sin)
        attn = window_attention(q, k, positions, W, layer.self_attn.scaling)
        s_heads = saliency_per_head(attn, g)
        expected = ref.saliency_from_attention(attns[layer_idx], g, W)
        np.testing.assert_allclose(s_heads.numpy(), expected, rtol=1e-4, atol=1e-6)
        ours = attention_metrics(attn, s_heads.sum(0))
        np.testing.assert_allclose(
            ours, ref.metrics_from_attention(attns[layer_idx], W), rtol=1e-4, atol=1e-5
        )


def test_centrality_is_the_discounted_sum():
    torch.manual_seed(0)
    layers = [torch.rand(20, dtype=torch.float64) for _ in range(5)]
    c = Centrality(lam=0.7)
    for s in layers:
        value = c.update(s)
    expected = sum(0.7 ** (4 - l) * layers[l] for l in range(5))
    torch.testing.assert_close(value, expected)


def _reference_structkv(model, ids, pivot, lam, r_struct, r_kv, pooling):
    """Propagated positions, per-layer per-head kept positions, and logits, by brute force."""
    g = model.config.num_key_value_heads
    k_struct = math.ceil(r_struct * N - 1e-9)

    def keep(attns, _positions):
        c = sum(
            lam ** (pivot - l) * ref.saliency_from_attention(attns[l], g, W).sum(0)
            for l in range(pivot + 1)
        )
        return ref.topk_window(ref.max_pool(c, pooling, W), k_struct, W)

    attns, pos, logits = ref.layer_by_layer(ref.to_float64_eager(model), ids, pivot, keep)
    k_kv = math.ceil(r_kv * N - 1e-9)
    kv = []
    for l, a in enumerate(attns):
        s = ref.max_pool(ref.saliency_from_attention(a, g, W), pooling, W)
        kv.append([[int(pos[l][i]) for i in ref.topk_window(s[h], k_kv, W)] for h in range(g)])
    return [int(p) for p in pos[-1]], kv, logits


@pytest.mark.parametrize("pivot,lam", [(2, 0.5), (1, 0.9)])
def test_structkv_sets_positions_and_logits(tiny, pivot, lam):
    ids = _ids()
    method = StructKV(r_struct=0.4, r_kv=0.25, lam=lam, pivot=pivot, pooling=1, window=W)
    out = method.prefill(tiny.model, ids)
    propagated, kv, logits = _reference_structkv(tiny.model, ids, pivot, lam, 0.4, 0.25, 1)

    assert out.stats.pivot_layer == pivot
    assert out.stats.propagated_positions == propagated
    assert propagated[-W:] == list(range(N - W, N))  # window always kept
    assert len(propagated) == math.ceil(0.4 * N) + W
    for l, layer_cache in enumerate(out.cache.layers):
        kept = layer_cache.kept_positions().tolist()
        assert kept == kv[l], f"layer {l}"
        for head in kept:
            assert head == sorted(head) and head[-W:] == list(range(N - W, N))
            assert len(head) == math.ceil(0.25 * N) + W
            if l > pivot:
                assert set(head) <= set(propagated)
    torch.testing.assert_close(out.logits.double(), logits, atol=1e-4, rtol=1e-4)


def test_fastkv_is_structkv_with_lambda_zero_and_matches_reference(tiny_llama):
    ids = _ids(seed=5)
    fast = FastKV(tsp_layer=3, r_struct=0.3, pooling=1).prefill(tiny_llama.model, ids)
    struct = StructKV(pivot=3, lam=0.0, r_struct=0.3, pooling=1).prefill(tiny_llama.model, ids)
    propagated, _, _ = _reference_structkv(tiny_llama.model, ids, 3, 0.0, 0.3, 0.1, 1)
    assert fast.stats.propagated_positions == propagated
    assert struct.stats.propagated_positions == propagated


def test_pooled_selection_is_topk_of_pooled_scores(tiny_llama):
    """With max pooling, plateaus create ties; any tie-break is valid, so check the definition:
    every kept token scores >= the k-th best, every dropped one <= it."""
    model = tiny_llama.model
    ids = _ids(seed=7)
    g = model.config.num_key_value_heads
    out = SnapKV(r_kv=0.2, pooling=7).prefill(model, ids)
    attns, _, _ = ref.layer_by_layer(ref.to_float64_eager(model), ids)
    k = math.ceil(0.2 * N)
    for l, a in enumerate(attns):
        pooled = ref.max_pool(ref.saliency_from_attention(a, g, W), 7, W)
        for h in range(g):
            kept = set(out.cache.layers[l].kept_positions()[h].tolist()) - set(range(N - W, N))
            assert len(kept) == k
            kth = np.sort(pooled[h, : N - W])[::-1][k - 1]
            dropped = set(range(N - W)) - kept
            assert min(pooled[h, j] for j in kept) >= kth - 1e-6
            assert max(pooled[h, j] for j in dropped) <= kth + 1e-6


def test_gemfilter_reruns_on_selected_tokens(tiny_llama):
    model = tiny_llama.model
    ids = _ids(seed=9)
    out = GemFilter(r_kv=0.25).prefill(model, ids)
    layer = int(0.4 * 6)
    attns, _, _ = ref.layer_by_layer(ref.to_float64_eager(model), ids)
    last_row = attns[layer][:, -1, :].sum(0)
    padded = np.pad(last_row, 2, constant_values=np.nan)
    pooled = np.array([np.nanmean(padded[j : j + 5]) for j in range(N)])
    expected = ref.topk_window(pooled, math.ceil(0.25 * N), W)
    assert out.stats.propagated_positions == expected
    # The re-run is the unmodified model on the selected tokens, positions restarting at 0.
    rerun = model(ids[expected][None]).logits[0, -1]
    torch.testing.assert_close(out.logits, rerun, atol=1e-4, rtol=1e-4)
    assert out.cache.next_position == len(expected)
    assert out.cache.layers[0].kept_positions()[0].tolist() == list(range(len(expected)))


def test_gemfilter_window_score_is_fastkvs_selection_then_the_rerun(tiny_llama):
    """``filter_score="window"``: the tokens re-run are exactly those FastKV propagates from the
    same layer at the same budget (its window saliency, pooled and chunked alike), and the
    re-run is still the unmodified model on them alone; the default scoring picks others."""
    model = tiny_llama.model
    ids = _ids(seed=9)
    for chunk in (0, 4):
        gem = GemFilter(r_kv=0.25, filter_layer=2, filter_score="window", chunk=chunk)
        out = gem.prefill(model, ids)
        fast = FastKV(tsp_layer=2, r_struct=0.25, chunk=chunk).prefill(model, ids)
        assert out.stats.propagated_positions == fast.stats.propagated_positions
        kept = out.stats.propagated_positions
        torch.testing.assert_close(
            out.logits, model(ids[kept][None]).logits[0, -1], atol=1e-4, rtol=1e-4
        )
    last = GemFilter(r_kv=0.25, filter_layer=2, chunk=chunk).prefill(model, ids)
    assert last.stats.propagated_positions != out.stats.propagated_positions


def test_pooling_by_hand_ignores_the_window():
    from structkv.saliency import pool_scores

    s = torch.tensor([1.0, 5.0, 2.0, 0.0, 9.0, 9.0])  # last two: the window
    assert pool_scores(s, 3, window=2).tolist() == [5, 5, 5, 2, 9, 9]
    avg = pool_scores(s, 3, window=2, mode="avg")
    torch.testing.assert_close(avg, torch.tensor([6 / 3, 8 / 3, 7 / 3, 2 / 3, 9, 9]))
    assert pool_scores(s, 1, window=2) is s


def test_avg_pooled_snapkv_matches_reference_sets(tiny_llama):
    """kvpress-style settings (average pooling, kernel 5): exact kept sets vs float64."""
    model = tiny_llama.model
    ids = _ids(seed=8)
    g = model.config.num_key_value_heads
    out = SnapKV(r_kv=0.2, pooling=5, pool_mode="avg").prefill(model, ids)
    attns, _, _ = ref.layer_by_layer(ref.to_float64_eager(model), ids)
    k = math.ceil(0.2 * N)
    for l, a in enumerate(attns):
        pooled = ref.avg_pool(ref.saliency_from_attention(a, g, W), 5, W)
        for h in range(g):
            kept = out.cache.layers[l].kept_positions()[h].tolist()
            assert kept == ref.topk_window(pooled[h], k, W), f"layer {l} head {h}"


def test_topk_ties_go_to_the_lower_index():
    """ONNX TopK's rule; the engine and the reference must keep the same tokens on plateaus."""
    from structkv.selection import topk_with_window

    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 5.0, 5.0], [3.0, 3.0, 3.0, 3.0, 3.0, 0, 0]])
    assert topk_with_window(scores, 2, window=2).tolist() == [[1, 2, 5, 6], [0, 1, 5, 6]]
