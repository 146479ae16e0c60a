"""§1 Local saliency: the attention that the last ``w`` prompt tokens pay to every token.

Only the ``w`` window rows of attention are computed (``[H, w, n]`` in fp32), never ``n x n``;
the layer's own attention output still comes from SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from structkv.layers import sliding_window, visibility_mask


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    window: int,
    scaling: float,
    sliding: int | None = None,
) -> torch.Tensor:
    """Causal softmax attention of the last ``window`` queries over all keys, fp32 ``[H, w, n]``.

    ``q`` is ``[1, H, n, D]`` and ``k`` is ``[1, G, n, D]``, both post-RoPE.
    """
    heads, groups = q.shape[1], k.shape[1]
    d = q.shape[-1]
    # Heads of one KV group are adjacent, so fold them into the row axis: [G, (H/G)·w, D] @
    # [G, D, n] attends each group's heads to its own keys without copying K per head.
    q_win = q[0, :, -window:].float().reshape(groups, (heads // groups) * window, d)
    scores = torch.matmul(q_win, k[0].float().transpose(1, 2)).view(heads, window, -1) * scaling
    visible = visibility_mask(positions[-window:], positions, sliding)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1)


def saliency_per_head(attn: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """S_{g,j} = (1/w) Σ over window rows, summed over the query heads of group g: ``[G, n]``."""
    h, w, n = attn.shape
    return attn.view(num_kv_heads, h // num_kv_heads, w, n).sum(dim=1).mean(dim=1)


POOL_MODES = ("max", "avg")


def pool_scores(
    scores: torch.Tensor, kernel: int, window: int = 0, mode: str = "max"
) -> torch.Tensor:
    """1-D pooling over the non-window tokens (stride 1, same padding); kernel 1 disables.

    As in SnapKV's own code (and kvpress), only the first ``n - window`` scores are pooled: the
    window is always kept, so its large self-attention must not leak into the tokens just before
    it. ``max`` is SnapKV/FastKV's default; ``avg`` is kvpress's SnapKVPress (zero padding
    counted at the edges). Window scores are returned unchanged.
    """
    if kernel <= 1:
        return scores
    if kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be odd, got {kernel}")
    if mode not in POOL_MODES:
        raise ValueError(f"pooling mode must be one of {POOL_MODES}, got {mode!r}")
    n = scores.shape[-1]
    m = n - window
    if m <= 0:
        return scores
    # Shifted views instead of F.max_pool1d/avg_pool1d: identical values (max is exact; the
    # sum runs in the same order), and torch.export keeps the length symbolic through them
    # where the pooling kernels specialise it.
    r = kernel // 2
    fill = float("-inf") if mode == "max" else 0.0
    padded = F.pad(scores[..., :m], (r, r), value=fill)
    views = torch.stack([padded[..., i : i + m] for i in range(kernel)])
    pooled = views.amax(0) if mode == "max" else views.sum(0) / kernel
    return torch.cat([pooled, scores[..., m:]], dim=-1)


def layer_saliency(
    layer, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, window: int, num_kv: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's window attention ``[H, w, n]`` and per-KV-head saliency ``[G, n]`` (§1), for
    the prefill loop and the exported prefill graphs alike."""
    attn = window_attention(q, k, positions, window, layer.self_attn.scaling, sliding_window(layer))
    return attn, saliency_per_head(attn, num_kv)
