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
    survive); a chunk keeps a span together (kvpress's ChunkKVPress does this for the cache)."""
    n = scores.shape[-1]
    candidates = n - window
    whole = candidates // chunk
    if whole == 0:  # nothing to choose between: keep everything
        return torch.arange(n, device=scores.device).expand(*scores.shape[:-1], n)
    rest = candidates - whole * chunk
    keep = min(whole, max(1, (k - rest) // chunk))
    means = scores[..., : whole * chunk].reshape(*scores.shape[:-1], whole, chunk).mean(-1)
    best = means.sort(dim=-1, descending=True, stable=True).indices[..., :keep].sort(-1).values
    spans = (best[..., None] * chunk + torch.arange(chunk, device=scores.device)).flatten(-2)
    tail = torch.arange(whole * chunk, n, device=scores.device).expand(*scores.shape[:-1], -1)
    return torch.cat([spans, tail], dim=-1)


def gather_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-head gather: ``x`` ``[..., G, n, D]`` and ``keep`` ``[..., G, K]`` -> ``[..., G, K, D]``
    (each KV head its own tokens; leading dims such as layers broadcast)."""
    return x.gather(-2, keep[..., None].expand(*keep.shape, x.shape[-1]))
