"""Span-preserving (chunk-level) selection: whole spans of c tokens are kept instead of single
tokens, for every method (``--chunk``), against a plain-Python reference."""

from __future__ import annotations

import pytest
import torch

from structkv.errors import StructKVError
from structkv.methods import METHODS, get_method
from structkv.selection import select_tokens, selected_count


def _reference(scores: list[float], k: int, window: int, chunk: int) -> list[int]:
    """Chunks of ``chunk`` tokens from the start over the non-window tokens, the remainder
    before the window always kept, the best max(1, (k - r) // chunk) chunks by mean score
    (ties to the lower chunk), ascending."""
    n = len(scores)
    m = n - window
    whole = m // chunk
    if whole == 0:
        return list(range(n))
    rest = m - whole * chunk
    means = [sum(scores[c * chunk : (c + 1) * chunk]) / chunk for c in range(whole)]
    order = sorted(range(whole), key=lambda c: (-means[c], c))
    chosen = sorted(order[: min(whole, max(1, (k - rest) // chunk))])
    return [c * chunk + i for c in chosen for i in range(chunk)] + list(range(whole * chunk, n))


CASES = [(100, 8, 20, 8), (257, 32, 52, 16), (40, 8, 3, 4), (30, 8, 100, 5), (12, 8, 2, 8)]


@pytest.mark.parametrize("n, window, k, chunk", CASES)
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_chunks_match_the_reference(n, window, k, chunk, kind):
    g = torch.Generator().manual_seed(n)
    scores = torch.rand(3, n, generator=g)
    if kind == "ties":
        scores = (scores * 3).floor()
    got = select_tokens(scores, k, window, 1, "max", chunk=chunk)
    for row, kept in zip(scores, got):
        assert kept.tolist() == _reference(row.tolist(), k, window, chunk)


def test_chunk_spans_stay_whole_where_tokens_are_cut_apart():
    """A 7-token span of high scores with gaps inside it: token-level top-k drops the gaps,
    the chunk keeps the whole span (and the budget is not exceeded)."""
    n, window, k = 200, 8, 14
    scores = torch.full((n,), 0.1)
    scores[64:72] = torch.tensor([5.0, 5.0, 0.0, 5.0, 5.0, 0.0, 5.0, 5.0])
    tokens = select_tokens(scores, k, window, 1, "max")
    chunks = select_tokens(scores, k, window, 1, "max", chunk=8)
    assert not set(range(64, 72)) <= set(tokens.tolist())
    assert set(range(64, 72)) <= set(chunks.tolist())
    assert len(chunks) - window <= max(k, 8 + (n - window) % 8)


def test_chunk_zero_and_one_are_token_level():
    scores = torch.rand(2, 3, 300)
    token = select_tokens(scores, 30, 8, 7, "avg")
    assert torch.equal(select_tokens(scores, 30, 8, 7, "avg", chunk=0), token)
    assert torch.equal(select_tokens(scores, 30, 8, 7, "avg", chunk=1), token)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_takes_the_chunk_knob(tiny_llama, name):
    """Offered to the baselines too, so comparisons stay fair: every kept set is whole chunks
    (plus the remainder and the window) wherever a method selects."""
    knobs = {"pivot": 2, "lam": 0.5} if name == "structkv" else {}
    method = get_method(name, chunk=8, **knobs)
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0))
    out = method.prefill(tiny_llama.model, ids)
    whole = (300 - method.window) // 8

    def chunked(kept: list[int]) -> bool:
        inside = [p for p in kept if p < whole * 8]
        return len(inside) == 8 * len({p - p % 8 for p in inside})

    if name == "gemfilter":  # its filter picks the tokens it re-runs (positions restart at 0)
        assert chunked(out.stats.propagated_positions)
        return
    for layer in out.cache.layers:
        for head in layer.kept_positions().tolist():
            assert chunked(head) or name in ("full", "streamingllm"), name
            assert head == sorted(set(head))


def test_bad_chunk_is_refused_and_engines_take_chunks():
    with pytest.raises(StructKVError, match="chunk must be an integer >= 0"):
        get_method("snapkv", chunk=-1)
    get_method("structkv", chunk=16, pivot=2, lam=0.5).check_engine(num_layers=6)


@pytest.mark.parametrize("n, window, k, chunk", CASES)
def test_selected_count_is_what_the_selection_keeps(n, window, k, chunk):
    """What the scheduler reserves per layer equals what select_tokens keeps."""
    scores = torch.rand(2, n, generator=torch.Generator().manual_seed(n))
    kept = select_tokens(scores, k, window, 1, "max", chunk=chunk)
    assert kept.shape[-1] == selected_count(n, k, window, chunk)
    assert select_tokens(scores, k, window, 1, "max").shape[-1] == selected_count(n, k, window)
