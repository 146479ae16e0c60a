"""§4/§5 token selection: top-k of a score vector plus the observation window, sorted.

Window tokens are always kept and never compete in the top-k; the result is sorted ascending so
that a compacted sequence keeps causal order and a per-head KV set is in position order.
"""

from __future__ import annotations

import math

import torch


def budget(ratio: float, n_prompt: int) -> int:
    """ceil(ratio · N) tokens, robust to float noise (0.1 · 30 is 3.0000000000000004)."""
    return math.ceil(ratio * n_prompt - 1e-9)


def topk_with_window(scores: torch.Tensor, k: int, window: int) -> torch.Tensor:
    """Indices of the ``k`` best non-window tokens of ``scores[..., n]`` plus the last ``window``
    tokens, sorted ascending; ``k`` is capped at the ``n - window`` candidates."""
    n = scores.shape[-1]
    candidates = n - window
    k = max(0, min(k, candidates))
    top = scores[..., :candidates].topk(k, dim=-1).indices
    tail = torch.arange(candidates, n, device=scores.device).expand(*scores.shape[:-1], window)
    return torch.cat([top, tail], dim=-1).sort(dim=-1).values
