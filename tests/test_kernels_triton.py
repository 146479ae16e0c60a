"""The OpenAI Triton selection kernels (the TensorRT plugin's kernels) against the torch path,
run through Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1): identical indices,
not close ones — the engine and the plugin must keep the same tokens."""

from __future__ import annotations

import pytest
import torch

from structkv.selection import budget, gather_tokens, select_tokens

st = pytest.importorskip(
    "structkv.kernels.select_triton", reason="OpenAI Triton not installed (pip install triton)"
)


def _scores(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.rand(shape, generator=g)
    if kind == "signed":  # negative scores exercise the float -> ordered-int key mapping
        return torch.randn(shape, generator=g) * 1e3
    if kind == "ties":  # few distinct values: plateaus everywhere, ties decide most slots
        return torch.randint(0, 4, shape, generator=g).float()
    if kind == "zeros":  # -0.0 and +0.0 are one value to the torch path
        return torch.where(torch.rand(shape, generator=g) < 0.5, -0.0, 0.0)
    return torch.full(shape, 0.25)  # constant


@pytest.mark.parametrize("kind", ["random", "signed", "ties", "zeros", "constant"])
@pytest.mark.parametrize(
    "n, window, ratio, pooling, mode",
    [
        (10, 8, 0.2, 7, "max"),  # N = w + 2: two candidates
        (11, 8, 0.5, 1, "max"),
        (300, 8, 0.1, 7, "avg"),
        (1000, 32, 0.2, 7, "max"),
        (4099, 16, 0.3, 5, "avg"),
    ],
)
def test_selection_matches_torch(kind, n, window, ratio, pooling, mode):
    scores = _scores(kind, (n,), seed=n)
    k = budget(ratio, n)
    got = st.select_tokens(scores, k, window, pooling, mode)
    assert torch.equal(got, select_tokens(scores, k, window, pooling, mode))


@pytest.mark.parametrize("kind", ["random", "ties"])
def test_selection_at_128k_keeps_more_than_tensorrt_topk_allows(kind):
    """K = ceil(0.2 * 131072) + 32 = 26247 > 3840, TensorRT TopK's limit."""
    n, window = 131072, 32
    scores = _scores(kind, (n,), seed=7)
    k = budget(0.2, n)
    got = st.select_tokens(scores, k, window, 7, "max")
    assert got.shape == (k + window,) and k + window > 3840
    assert torch.equal(got, select_tokens(scores, k, window, 7, "max"))


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_kv_selection_per_layer_and_head_and_the_gathers(mode):
    """KV selection: saliency [l, G, n] gives each layer and KV head its own kept set; keys,
    values and positions are gathered with those sets."""
    layers, heads, n, d, window = 3, 2, 257, 16, 8
    saliency = _scores("ties", (layers, heads, n), seed=1)
    k = budget(0.1, 1000)  # after the pivot the budget is a fraction of the prompt, not of n
    keep = st.select_tokens(saliency, k, window, 7, mode)
    assert torch.equal(keep, select_tokens(saliency, k, window, 7, mode))
    keys = torch.randn(layers, heads, n, d)
    assert torch.equal(st.gather_tokens(keys, keep), gather_tokens(keys, keep))
    half = keys.to(torch.float16)
    assert torch.equal(st.gather_tokens(half, keep), gather_tokens(half, keep))
    positions = torch.randperm(5000)[:n].sort().values
    assert torch.equal(st.gather_positions(positions, keep), positions[keep])


def test_structural_compaction_gathers_hidden_rows():
    n, e, window = 500, 64, 8
    centrality = _scores("random", (n,), seed=3)
    keep = st.select_tokens(centrality, budget(0.2, n), window, 7, "max")
    hidden = torch.randn(1, n, e)
    assert torch.equal(st.gather_tokens(hidden, keep[None]), hidden[:, keep])


@pytest.mark.parametrize("kind", ["random", "signed", "ties", "zeros", "constant"])
@pytest.mark.parametrize(
    "n, window, ratio, pooling, mode, chunk",
    [
        (300, 8, 0.2, 7, "max", 16),  # remainder 4 between the last chunk and the window
        (40, 8, 0.1, 1, "avg", 16),  # budget below one chunk: one chunk is kept anyway
        (1000, 32, 0.3, 7, "avg", 8),
        (26, 8, 0.5, 3, "max", 16),  # the shortest engine prompt: one whole chunk, kept
        (20, 8, 0.2, 7, "max", 16),  # no whole chunk: everything is kept
        (4099, 16, 0.2, 7, "max", 32),
    ],
)
def test_chunk_selection_matches_torch(kind, n, window, ratio, pooling, mode, chunk):
    """Chunk mode (span-preserving selection) keeps the torch path's tokens exactly, per layer
    and KV head: the chunk means are summed in the torch cumsum's own order and precision."""
    scores = _scores(kind, (2, 2, n), seed=n + chunk)
    k = budget(ratio, 2 * n)  # KV selection: a fraction of the prompt, not of n
    got = st.select_tokens(scores, k, window, pooling, mode, chunk)
    assert torch.equal(got, select_tokens(scores, k, window, pooling, mode, chunk))


def test_chunk_means_are_summed_as_the_torch_cumsum_sums():
    """After a large early score a float32 running sum rounds every step (1e8 + 5 and 1e8 + 6
    both become 1e8 + 8); torch's CPU cumsum accumulates in float64 and so must the kernel, or
    the chunk ranking differs from the torch path's. Here float64 means rank chunk 3 (sixes)
    above chunk 1 (fives); float32 ones tie them and the lower chunk would win."""
    scores = torch.zeros(96)
    scores[0] = 1e8
    scores[16:32] = 5.0
    scores[48:64] = 6.0
    k = 40  # window 8, remainder 8: two chunks of 16, chunk 0 and the better of 1 and 3
    want = select_tokens(scores, k, 8, 1, "max", 16)
    assert want[16:32].tolist() == list(range(48, 64))
    assert torch.equal(st.select_tokens(scores, k, 8, 1, "max", 16), want)
