"""§4/§5 token selection: top-k of a score vector plus the observation window, sorted.

Window tokens are always kept and never compete in the top-k; the result is sorted ascending so
that a compacted sequence keeps causal order and a per-head KV set is in position order.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from structkv.saliency import pool_scores


def budget(ratio: float, n_prompt: int) -> int:
    """ceil(ratio · N) in exact integer arithmetic (0.1 · 30 is 3.0000000000000004 in floats).

    Integer form also lets ``torch.export`` keep N symbolic: it can reason about
    ``(p·N + q - 1) // q`` but not about the ceiling of a float."""
    frac = Fraction(ratio).limit_denominator(1_000_000)
    return (frac.numerator * n_prompt + frac.denominator - 1) // frac.denominator


def topk_with_window(scores: torch.Tensor, k: int, window: int) -> torch.Tensor:
    """Indices of the ``k`` best non-window tokens of ``scores[..., n]`` plus the last ``window``
    tokens, sorted ascending; ``k`` is capped at the ``n - window`` candidates.

    Ties go to the lower index (a stable sort), as ONNX TopK specifies: max pooling makes
    plateaus of equal scores, and the torch reference, the ONNX engine and any GPU kernel
    must keep the same tokens."""
    n = scores.shape[-1]
    candidates = n - window
    if torch.compiler.is_exporting():
        # A full descending TopK (ONNX: ties to the lower index, by spec) then a slice: the
        # exporter cannot prove ceil(R·N) <= N - w for a symbolic N, so no topk(k) here.
        order = scores[..., :candidates].topk(candidates, dim=-1).indices
    else:  # torch.topk leaves ties unspecified; a stable sort makes the same choice
        order = scores[..., :candidates].sort(dim=-1, descending=True, stable=True).indices
    top = order[..., : max(0, min(k, candidates))]
    tail = torch.arange(candidates, n, device=scores.device).expand(*scores.shape[:-1], window)
    return torch.cat([top, tail], dim=-1).sort(dim=-1).values


def select_tokens(
    scores: torch.Tensor, k: int, window: int, pooling: int, pool_mode: str, chunk: int = 0
) -> torch.Tensor:
    """The one selection of §4 and §5: pool the non-window scores, keep the top ``k`` plus the
    window, ascending. ``scores`` is ``[..., n]`` (centrality ``[n]`` for propagation, per-head
    saliency ``[G, n]`` or ``[layers, G, n]`` for KV selection). The torch methods, calibration
    and the exported ``compact`` / ``kv_select`` graphs all call this. ``chunk`` > 1 keeps whole
    chunks instead of single tokens (:func:`topk_chunks_with_window`)."""
    pooled = pool_scores(scores, pooling, window, pool_mode)
    if chunk > 1:
        return topk_chunks_with_window(pooled, k, window, chunk)
    return topk_with_window(pooled, k, window)


def topk_chunks_with_window(scores: torch.Tensor, k: int, window: int, chunk: int) -> torch.Tensor:
    """Span-preserving selection: the non-window tokens are cut into chunks of ``chunk`` tokens
    from the start; a chunk's score is the mean of its (pooled) scores; the best chunks are kept
    whole, plus the window, ascending (ties to the lower chunk). The ``r = (n - w) % chunk``
    tokens between the last whole chunk and the window belong to no chunk and are always kept
    (they extend the window), so every row keeps the same count: ``max(1, (k - r) // chunk)``
    chunks, i.e. at most ``max(k, chunk + r)`` non-window tokens.

    Why: token-level top-k cuts a 7-digit number or a name apart (typically 5 of 7 digits
    survive); a chunk keeps a span together (kvpress's ChunkKVPress does this for the cache).

    Written for the exported graphs too (``torch.export`` with a symbolic n >= w + c): chunk
    means from a prefix sum (no reshape of a symbolic length), one extra never-chosen chunk so
    the chunk axis is never of size 1 (the shape solver would specialise on it), the kept
    chunks marked in a mask and the kept positions read off in ascending order by a TopK of
    ``position + n·dropped``. The budget is clamped at 0 before its floor division: the solver
    rewrites ``(k - r) // c`` into a floor division of a negative number, which ONNX's integer
    Div truncates instead (one chunk too many)."""
    n = scores.shape[-1]
    candidates = n - window
    whole = candidates // chunk
    if not torch.compiler.is_exporting() and whole == 0:  # nothing to choose: keep everything
        return torch.arange(n, device=scores.device).expand(*scores.shape[:-1], n)
    rest = candidates - whole * chunk
    keep = torch.sym_min(whole, torch.sym_max(1, torch.sym_max(k - rest, 0) // chunk))
    device = scores.device
    prefix = torch.cat([torch.zeros_like(scores[..., :1]), scores.cumsum(-1)], -1)
    spans = torch.arange(whole + 1, device=device)  # chunk `whole` is the never-chosen extra
    ends = ((spans + 1) * chunk).clamp(max=n)
    means = (prefix[..., ends] - prefix[..., ends - chunk]) / chunk
    means = means.masked_fill(spans == whole, float("-inf"))
    if torch.compiler.is_exporting():  # ONNX TopK: ties to the lower index, by spec
        order = means.topk(whole + 1, dim=-1).indices
    else:  # torch.topk leaves ties unspecified; a stable sort makes the same choice
        order = means.sort(dim=-1, descending=True, stable=True).indices
    chosen = torch.zeros_like(means).scatter(-1, order[..., :keep], 1.0) > 0
    positions = torch.arange(n, device=device)
    kept = chosen[..., (positions // chunk).clamp(max=whole)] | (positions >= whole * chunk)
    key = positions + n * (~kept).to(positions.dtype)
    count = keep * chunk + n - whole * chunk
    return key.topk(count, dim=-1, largest=False).indices


def min_engine_tokens(window: int, chunk: int = 0) -> int:
    """The shortest prompt an exported engine takes: the window plus two tokens to choose from,
    or plus one whole chunk (its graphs are traced for a symbolic length of at least that)."""
    return window + max(2, chunk)


def selected_count(n: int, k: int, window: int, chunk: int = 0) -> int:
    """How many of ``n`` tokens :func:`select_tokens` keeps for a budget of ``k`` (window
    included): what the paged cache must hold per layer. With chunks it can exceed ``k + w``
    by less than a chunk plus the remainder (:func:`topk_chunks_with_window`)."""
    candidates = n - window
    if chunk <= 1:
        return max(0, min(k, candidates)) + window
    whole = candidates // chunk
    if whole == 0:
        return n
    rest = candidates - whole * chunk
    return min(whole, max(1, max(k - rest, 0) // chunk)) * chunk + rest + window


def gather_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-head gather: ``x`` ``[..., G, n, D]`` and ``keep`` ``[..., G, K]`` -> ``[..., G, K, D]``
    (each KV head its own tokens; leading dims such as layers broadcast)."""
    return x.gather(-2, keep[..., None].expand(*keep.shape, x.shape[-1]))
