"""kvpress cross-check: our SnapKV/StreamingLLM keep kvpress's token sets (kvpress env only)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from structkv.eval.peer import keep_count, set_agreement
from structkv.methods import get_method


def test_set_agreement_by_hand():
    ours = torch.tensor([[0, 1, 2, 3], [0, 2, 4, 6]])
    theirs = torch.tensor([[3, 2, 1, 0], [0, 2, 5, 7]])
    assert set_agreement(ours, theirs) == (0.5, (1.0 + 0.5) / 2)


@pytest.mark.parametrize("n", [100, 1000, 2049, 4096, 8190])
def test_press_ratio_keeps_exactly_our_count(n):
    """kvpress keeps int(N * (1 - ratio)); the ratio we pass must give our k + w exactly."""
    keep = keep_count(n, 0.1, 8)
    ratio = 1.0 - (keep + 0.5) / n
    assert max(1, int(n * (1 - ratio))) == keep


needs_kvpress = pytest.mark.skipif(
    importlib.util.find_spec("kvpress") is None,
    reason="kvpress is not installed (it needs transformers < 5.3: pip install 'structkv[peer]' "
    "in a separate environment to run the peer cross-check)",
)


@needs_kvpress
@pytest.mark.parametrize(
    "press_name,ours", [("snapkv", "snapkv"), ("streamingllm", "streamingllm")]
)
def test_kept_sets_equal_kvpress(tiny_llama, press_name, ours):
    from structkv.eval.peer import import_kvpress, make_press, record_kept

    kvpress = import_kvpress()
    model = tiny_llama.model
    ids = torch.randint(0, 256, (120,), generator=torch.Generator().manual_seed(4))
    keep = keep_count(120, 0.1, 8)
    press = make_press(kvpress, press_name, 120, keep, window=8, kernel=5)
    kept = record_kept(press, kvpress)
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode(), press(model):
        model(input_ids=ids[None], past_key_values=cache)
    assert cache.layers[0].keys.shape[2] == keep  # the cache really holds that many
    method = get_method(ours, window=8, pooling=5, pool_mode="avg")
    out = method.prefill(model, ids)
    for layer, lc in enumerate(out.cache.layers):
        assert set_agreement(lc.kept_positions(), kept[layer]) == (1.0, 1.0), f"layer {layer}"
