"""The engine's stages as small torch modules, each traced to its own ONNX graph.

They call the same functions as the reference prefill (:mod:`structkv.layers`,
:mod:`structkv.saliency`, :mod:`structkv.selection`), so an engine computes what
``structkv generate`` computes; the parity tests hold them to it. Stages:

- :class:`PrePivot`   layers 0..L* on the whole prompt: hidden state, every layer's post-RoPE K/V,
  per-KV-head saliency S^(l)_g, centrality C and the pivot statistics (H, ρ, V) per layer.
- :class:`Compact`    top-k of pooled C plus the window, sorted; gather of hidden rows and
  original positions. Kept isolated: it is what the TensorRT plugin replaces.
- :class:`PostPivot`  layers L*+1..L-1 on the compacted tokens with their original positions.
- :class:`KVSelect`   §5 per layer and KV head: top-k of pooled S^(l)_g plus the window, gathered.
- :class:`DecodeStep` one token for a batch, reading the paged KV pool through block tables
  inside the graph (gather by table, mask by context length).
"""

from __future__ import annotations

import torch

from structkv.layers import (
    attend,
    decoder_layers,
    final_logits,
    head_dims,
    prefill_layer,
    qkv,
    sliding_window,
)
from structkv.pivot import attention_metrics_tensor
from structkv.saliency import pool_scores, saliency_per_head, window_attention
from structkv.selection import budget, topk_with_window


def _rope(model, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin ``[b, n, D]`` for position ids ``[b, n]``."""
    ref = torch.empty(0, dtype=dtype, device=positions.device)
    return model.model.rotary_emb(ref, positions)


def _saliency(layer, q, k, positions, window: int, num_kv: int):
    attn = window_attention(q, k, positions, window, layer.self_attn.scaling, sliding_window(layer))
    heads = saliency_per_head(attn, num_kv)
    return attn, heads


class PrePivot(torch.nn.Module):
    """input_ids ``[1, N]`` -> hidden ``[1, N, E]``, keys/values ``[L*+1, G, N, D]``,
    saliency ``[L*+1, G, N]``, centrality ``[N]``, metrics ``[L*+1, 3]``."""

    def __init__(self, model, pivot: int, window: int, lam: float) -> None:
        super().__init__()
        self.model, self.pivot, self.window, self.lam = model, pivot, window, lam

    def forward(self, input_ids: torch.Tensor):
        n = input_ids.shape[1]
        positions = torch.arange(n, device=input_ids.device)
        h = self.model.model.embed_tokens(input_ids)
        cos, sin = _rope(self.model, positions[None], h.dtype)
        _, num_kv, _ = head_dims(self.model)
        keys, values, saliency, metrics = [], [], [], []
        centrality = None
        for layer in decoder_layers(self.model)[: self.pivot + 1]:
            h, q, k, v = prefill_layer(layer, h, positions, cos, sin, traced=True)
            attn, heads = _saliency(layer, q, k, positions, self.window, num_kv)
            s = heads.sum(0)
            centrality = s if centrality is None else self.lam * centrality + s
            keys.append(k[0])
            values.append(v[0])
            saliency.append(heads)
            metrics.append(attention_metrics_tensor(attn, s))
        return (
            h,
            torch.stack(keys),
            torch.stack(values),
            torch.stack(saliency),
            centrality,
            torch.stack(metrics),
        )


class Compact(torch.nn.Module):
    """hidden ``[1, N, E]``, centrality ``[N]`` -> hidden ``[1, n', E]``, positions ``[n']``
    with n' = ceil(R_struct · N) + w: §4's top-k of pooled C plus the window, ascending."""

    def __init__(self, r_struct: float, window: int, pooling: int, pool_mode: str) -> None:
        super().__init__()
        self.r_struct, self.window, self.pooling, self.pool_mode = (
            r_struct,
            window,
            pooling,
            pool_mode,
        )

    def forward(self, hidden: torch.Tensor, centrality: torch.Tensor):
        n = centrality.shape[0]
        scores = pool_scores(centrality, self.pooling, self.window, self.pool_mode)
        keep = topk_with_window(scores, budget(self.r_struct, n), self.window)
        return hidden[:, keep], keep


class PostPivot(torch.nn.Module):
    """hidden ``[1, n, E]``, positions ``[n]`` -> keys/values ``[L-L*-1, G, n, D]``, saliency
    ``[L-L*-1, G, n]`` and the last token's logits ``[1, V]``."""

    def __init__(self, model, pivot: int, window: int) -> None:
        super().__init__()
        self.model, self.pivot, self.window = model, pivot, window

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor):
        h = hidden
        cos, sin = _rope(self.model, positions[None], h.dtype)
        _, num_kv, _ = head_dims(self.model)
        keys, values, saliency = [], [], []
        for layer in decoder_layers(self.model)[self.pivot + 1 :]:
            h, q, k, v = prefill_layer(layer, h, positions, cos, sin, traced=True)
            _, heads = _saliency(layer, q, k, positions, self.window, num_kv)
            keys.append(k[0])
            values.append(v[0])
            saliency.append(heads)
        logits = final_logits(self.model, h[:, -1])
        return torch.stack(keys), torch.stack(values), torch.stack(saliency), logits


class KVSelect(torch.nn.Module):
    """keys/values ``[l, G, n, D]``, saliency ``[l, G, n]``, positions ``[n]`` and the prompt
    length ``prompt_len`` (a ``[N]`` dummy whose length is N: budgets are fractions of N) ->
    kept keys/values ``[l, G, k + w, D]`` and their positions ``[l, G, k + w]``."""

    def __init__(self, r_kv: float, window: int, pooling: int, pool_mode: str) -> None:
        super().__init__()
        self.r_kv, self.window, self.pooling, self.pool_mode = r_kv, window, pooling, pool_mode

    def forward(self, keys, values, saliency, positions, prompt_len):
        n_prompt = prompt_len.shape[0]
        scores = pool_scores(saliency, self.pooling, self.window, self.pool_mode)
        keep = topk_with_window(scores, budget(self.r_kv, n_prompt), self.window)  # [l, G, K]
        idx = keep[..., None].expand(-1, -1, -1, keys.shape[-1])
        return keys.gather(2, idx), values.gather(2, idx), positions[keep]


def _gather_blocks(pool: torch.Tensor, flat_tables: torch.Tensor, b: int, m: int) -> torch.Tensor:
    """``pool`` ``[L, blocks, G, block, ...]`` -> ``[L, B, G, M, block, ...]`` for the blocks of
    ``flat_tables`` (``[B * M]``, the batch's block tables row by row)."""
    picked = pool.index_select(1, flat_tables)  # [L, B*M, G, block, ...]
    picked = picked.reshape(pool.shape[0], b, m, *pool.shape[2:])
    return picked.transpose(2, 3)


class DecodeStep(torch.nn.Module):
    """One new token per sequence of a batch on the paged cache.

    Inputs: ``input_ids`` ``[B]``, ``positions`` ``[B]`` (the new token's), ``block_tables``
    ``[B, M]``, ``context_lens`` ``[B]`` (cached slots per sequence), the pools ``k_pool`` /
    ``v_pool`` ``[L, blocks, G, block, D]`` and ``pos_pool`` ``[L, blocks, G, block]`` (original
    positions, read by sliding-window layers). Outputs: ``logits`` ``[B, V]`` and the new
    token's ``new_keys`` / ``new_values`` ``[L, B, G, D]``, which the runtime writes into its pool.
    """

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, block_tables, context_lens, k_pool, v_pool, pos_pool):
        b, m = block_tables.shape
        num_layers, _, g, block, d = k_pool.shape
        slots = m * block
        h = self.model.model.embed_tokens(input_ids[:, None])  # [B, 1, E]
        cos, sin = _rope(self.model, positions[:, None], h.dtype)
        # Gather every layer's blocks at once: one Gather per pool instead of one per layer keeps
        # the graph small. index_select on the block axis becomes Gather(axis=1), which copies
        # only the batch's blocks; advanced indexing (k_pool[:, tables]) exported as a transpose
        # of the whole pool first, 40 ms per step for a 134 MB pool. [L, B, G, slots, D]
        flat = block_tables.reshape(-1)
        kc = _gather_blocks(k_pool, flat, b, m).reshape(num_layers, b, g, slots, d)
        vc = _gather_blocks(v_pool, flat, b, m).reshape(num_layers, b, g, slots, d)
        cached = torch.arange(slots, device=input_ids.device)[None, :] < context_lens[:, None]
        visible = torch.cat([cached, torch.ones_like(cached[:, :1])], dim=1)  # [B, slots + 1]
        base_mask = visible[:, None, None, :]  # the same for every head and layer
        layers = decoder_layers(self.model)
        pc = None
        if any(sliding_window(layer) is not None for layer in layers):
            pc = _gather_blocks(pos_pool, flat, b, m).reshape(num_layers, b, g, slots)
        new_keys, new_values = [], []
        for index, layer in enumerate(layers):
            q, k, v = qkv(layer, layer.input_layernorm(h), cos, sin)
            mask = base_mask
            window = sliding_window(layer)
            if window is not None:
                near = positions[:, None, None] - pc[index] < window  # [B, G, slots]
                near = torch.cat([near, torch.ones_like(near[..., :1])], dim=2)
                n_rep = q.shape[1] // g
                mask = (near & visible[:, None, :]).repeat_interleave(n_rep, dim=1)[:, :, None]
            keys = torch.cat([kc[index], k], dim=2)
            values = torch.cat([vc[index], v], dim=2)
            h = h + attend(layer, q, keys, values, mask, causal=False)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            new_keys.append(k[:, :, 0])
            new_values.append(v[:, :, 0])
        logits = final_logits(self.model, h[:, -1])
        return logits, torch.stack(new_keys), torch.stack(new_values)
