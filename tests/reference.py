"""Brute-force float64 reference for method.md §1–§5, independent of structkv's own code.

It runs the Hugging Face model itself with *eager* attention in float64 and reads the full
N x N attention matrices (fine for tiny models), then applies the formulas literally with
numpy: explicit sums over heads and window rows, explicit powers of λ, argsort top-k, a
sliding-window max for pooling. Nothing from ``structkv`` is imported here.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch


def to_float64_eager(model):
    ref = copy.deepcopy(model).double()
    ref.config._attn_implementation = "eager"
    for layer in ref.model.layers:
        layer.self_attn.config._attn_implementation = "eager"
    return ref


def saliency_from_attention(attn: np.ndarray, num_kv: int, window: int) -> np.ndarray:
    """attn [H, n, n] -> S [G, n]: mean over the last ``window`` rows, sum over group heads."""
    h, n, _ = attn.shape
    group = h // num_kv
    out = np.zeros((num_kv, n))
    for g in range(num_kv):
        for head in range(g * group, (g + 1) * group):
            for t in range(n - window, n):
                out[g] += attn[head, t] / window
    return out


def metrics_from_attention(attn: np.ndarray, window: int, kappa: float = 0.1):
    rows = attn[:, -window:, :]  # [H, w, n]
    n = rows.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(rows > 0, rows * np.log(rows), 0.0)
    entropy = float(np.mean(-plogp.sum(-1)))
    top = math.ceil(kappa * n - 1e-9)
    sparsity = float(np.mean(np.sort(rows, axis=-1)[..., ::-1][..., :top].sum(-1)))
    s = rows.sum(0).mean(0)  # per-token saliency summed over all heads
    x = s / s.mean()
    variance = float(np.mean((x - x.mean()) ** 2))
    return entropy, sparsity, variance


def max_pool(x: np.ndarray, kernel: int, window: int) -> np.ndarray:
    """Max over the kernel's span of the non-window scores; window scores unchanged."""
    if kernel <= 1:
        return x.copy()
    r, m = kernel // 2, x.shape[-1] - window
    out = x.copy()
    for j in range(m):
        out[..., j] = x[..., max(0, j - r) : min(m, j + r + 1)].max(-1)
    return out


def avg_pool(x: np.ndarray, kernel: int, window: int) -> np.ndarray:
    """Sum over the kernel's span of the non-window scores / kernel (zero padding counted)."""
    r, m = kernel // 2, x.shape[-1] - window
    out = x.copy()
    for j in range(m):
        out[..., j] = x[..., max(0, j - r) : min(m, j + r + 1)].sum(-1) / kernel
    return out


def topk_window(scores: np.ndarray, k: int, window: int) -> list[int]:
    n = scores.shape[-1]
    cand = n - window
    k = min(k, cand)
    order = np.argsort(-scores[:cand], kind="stable")[:k]
    return sorted([int(i) for i in order] + list(range(cand, n)))


def _causal_mask(positions: torch.Tensor) -> torch.Tensor:
    visible = positions[None, :] <= positions[:, None]
    mask = torch.zeros(visible.shape, dtype=torch.float64)
    return mask.masked_fill(~visible, float("-inf"))[None, None]


@torch.no_grad()
def layer_by_layer(
    ref, input_ids: torch.Tensor, pivot: int | None = None, keep=None, cuts: dict | None = None
):
    """Run HF's own decoder layers (eager, float64) and return per-layer attention matrices.

    If ``pivot`` is given, ``keep(attns, positions)`` returns the indices (into the rows
    present) to keep after that layer and later layers run on those rows only, with their
    original positions. ``cuts`` maps more layers to such functions (a second compaction).
    Returns (attentions per layer [H, n_l, n_l], positions per layer, last-token logits).
    """
    cuts = dict(cuts or {})
    if pivot is not None:
        cuts[pivot] = keep
    positions = torch.arange(input_ids.shape[0])
    h = ref.model.embed_tokens(input_ids[None])
    attns, pos_per_layer = [], []
    for index, layer in enumerate(ref.model.layers):
        pe = ref.model.rotary_emb(h, positions[None])
        residual = h
        x = layer.input_layernorm(h)
        out, weights = layer.self_attn(
            hidden_states=x, position_embeddings=pe, attention_mask=_causal_mask(positions)
        )
        h = residual + out
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        attns.append(weights[0].numpy())
        pos_per_layer.append(positions.clone())
        if index in cuts:
            idx = torch.tensor(cuts[index](attns, pos_per_layer))
            h = h[:, idx]
            positions = positions[idx]
    logits = ref.lm_head(ref.model.norm(h[:, -1]))[0]
    return attns, pos_per_layer, logits


@torch.no_grad()
def assert_matches_hf(model, prefill_logits, decode, ids: torch.Tensor, steps: int) -> None:
    """Compare our prefill logits and ``steps`` greedy decode steps with HF's own forward.

    ``decode(token) -> logits`` is the implementation under test; HF decodes with its own cache.
    """
    hf = model(ids[None], use_cache=True)
    torch.testing.assert_close(prefill_logits, hf.logits[0, -1], atol=1e-4, rtol=0)
    token, cache = int(hf.logits[0, -1].argmax()), hf.cache
    for _ in range(steps):
        ours = decode(token)
        step = model(torch.tensor([[token]]), cache=cache, use_cache=True)
        cache = step.cache
        torch.testing.assert_close(ours, step.logits[0, -1], atol=1e-4, rtol=0)
        token = int(step.logits[0, -1].argmax())
