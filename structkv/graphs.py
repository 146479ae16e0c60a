"""The engine's stages as small torch modules: ``structkv-export`` traces each to its own ONNX
graph, and the runtime's torch backend runs them eagerly as the parity oracle (so they live in
the core package, which both import).

They call the same stage functions as the reference prefill and decode loop
(:mod:`structkv.layers`, :mod:`structkv.saliency`, :mod:`structkv.centrality`,
:mod:`structkv.selection`), so an engine computes what ``structkv generate`` computes; the
parity tests hold them to it. Stages (named as the phases of :mod:`structkv.prefill`):

- :class:`PrePivot`   layers 0..L* on the whole prompt: hidden state, every layer's post-RoPE K/V,
  per-KV-head saliency S^(l)_g, centrality C and the pivot statistics (H, ρ, V) per layer.
- :class:`Compact`    top-k of pooled C plus the window, sorted; gather of hidden rows and
  original positions. Kept as its own graph so that a TensorRT plugin can replace it (planned;
  no such plugin exists yet).
- :class:`PostPivot`  layers L*+1..L-1 on the compacted tokens with their original positions.
- A two-stage engine (``--refine-layer R --r-refine r``, budgets that shrink with depth) splits
  that run at R: :class:`PostPivotFolding` (layers L*+1..R, folding the centrality on),
  :class:`Refine` (the second cut, to ceil(r · N) + w of the propagated tokens) and
  ``post_refine``, a :class:`PostPivot` from layer R+1.
- :class:`KVSelect`   §5 per layer and KV head: top-k of pooled S^(l)_g plus the window, gathered.
- :class:`DecodeStep` one token for a batch, reading the paged KV pool through block tables
  inside the graph (gather by table, mask by context length).
"""

from __future__ import annotations

import torch

from structkv.centrality import accumulate
from structkv.layers import (
    decode_layer,
    decode_mask,
    decoder_layers,
    final_logits,
    head_dims,
    prefill_layer,
    rope,
    sliding_window,
)
from structkv.pivot import attention_metrics_tensor
from structkv.prefill import compact
from structkv.saliency import layer_saliency
from structkv.selection import budget, gather_tokens, select_tokens

#: The engine's graphs, in the order a prefill runs them (decode last).
GRAPH_NAMES = ("pre_pivot", "compact", "post_pivot", "kv_select", "decode")
#: A two-stage engine's graphs: the run after the pivot is split at the refine layer.
REFINE_GRAPH_NAMES = (
    "pre_pivot", "compact", "post_pivot", "refine", "post_refine", "kv_select", "decode",
)  # fmt: skip


def graph_names(method) -> tuple[str, ...]:
    """The graphs an engine of ``method`` has: two more when it refines (a second cut)."""
    return REFINE_GRAPH_NAMES if getattr(method, "refine_layer", None) is not None else GRAPH_NAMES


#: Engine dtypes (``structkv-export --dtype``) and their torch types.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
        cos, sin = rope(self.model, positions, h.dtype)
        _, num_kv, _ = head_dims(self.model)
        keys, values, saliency, metrics = [], [], [], []
        centrality = None
        for layer in decoder_layers(self.model)[: self.pivot + 1]:
            h, q, k, v = prefill_layer(layer, h, positions, cos, sin, traced=True)
            attn, heads = layer_saliency(layer, q, k, positions, self.window, num_kv)
            s = heads.sum(0)
            centrality = accumulate(centrality, s, self.lam)
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


class _Selection(torch.nn.Module):
    """A graph that keeps the top ``ratio`` · N of pooled scores plus the window
    (:func:`structkv.selection.select_tokens`): the pivot's compaction, a two-stage engine's
    second cut and KV selection differ only in what they score and what they gather."""

    def __init__(
        self, ratio: float, window: int, pooling: int, pool_mode: str, chunk: int = 0
    ) -> None:
        super().__init__()
        self.ratio, self.window, self.pooling, self.pool_mode = ratio, window, pooling, pool_mode
        self.chunk = chunk

    def keep(self, scores: torch.Tensor, n_prompt) -> torch.Tensor:
        k = budget(self.ratio, n_prompt)
        return select_tokens(scores, k, self.window, self.pooling, self.pool_mode, self.chunk)


class Compact(_Selection):
    """hidden ``[1, N, E]``, centrality ``[N]`` -> hidden ``[1, n', E]``, positions ``[n']``
    with n' = ceil(R_struct · N) + w: §4's top-k of pooled C plus the window, ascending."""

    def forward(self, hidden: torch.Tensor, centrality: torch.Tensor):
        n = centrality.shape[0]
        return compact(hidden, torch.arange(n, device=hidden.device), self.keep(centrality, n))


class PostPivot(torch.nn.Module):
    """hidden ``[1, n, E]``, positions ``[n]`` -> keys/values ``[L-f, G, n, D]``, saliency
    ``[L-f, G, n]`` and the last token's logits ``[1, V]``, for layers f..L-1 (f = L*+1; in a
    two-stage engine's ``post_refine``, f = R+1)."""

    def __init__(self, model, first: int, window: int) -> None:
        super().__init__()
        self.model, self.first, self.window = model, first, window

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor):
        keys, values, saliency, h, _ = _run_compacted(
            self.model, decoder_layers(self.model)[self.first :], hidden, positions, self.window
        )
        logits = final_logits(self.model, h[:, -1])
        return keys, values, saliency, logits


class PostPivotFolding(torch.nn.Module):
    """A two-stage engine's ``post_pivot``: layers L*+1..R on the compacted tokens, folding the
    centrality on over them as the torch path does (C <- λ·C + S per layer; a token cut at the
    pivot is never chosen again, so only the present tokens' values are carried).

    hidden ``[1, n, E]``, positions ``[n]``, centrality ``[N]`` (``pre_pivot``'s, over the whole
    prompt) -> keys/values ``[R-L*, G, n, D]``, saliency ``[R-L*, G, n]``, hidden ``[1, n, E]``
    (input to layer R+1) and the present tokens' centrality ``[n]`` after layer R."""

    def __init__(self, model, pivot: int, refine_layer: int, window: int, lam: float) -> None:
        super().__init__()
        self.model, self.pivot, self.refine_layer = model, pivot, refine_layer
        self.window, self.lam = window, lam

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, centrality: torch.Tensor):
        layers = decoder_layers(self.model)[self.pivot + 1 : self.refine_layer + 1]
        keys, values, saliency, h, folded = _run_compacted(
            self.model, layers, hidden, positions, self.window, centrality[positions], self.lam
        )
        return keys, values, saliency, h, folded


def _run_compacted(model, layers, hidden, positions, window, centrality=None, lam=0.0):
    """``layers`` on compacted tokens at their original positions: stacked K/V and per-head
    saliency, the last hidden state and (given a start) the centrality folded over them."""
    h = hidden
    cos, sin = rope(model, positions, h.dtype)
    _, num_kv, _ = head_dims(model)
    keys, values, saliency = [], [], []
    for layer in layers:
        h, q, k, v = prefill_layer(layer, h, positions, cos, sin, traced=True)
        _, heads = layer_saliency(layer, q, k, positions, window, num_kv)
        if centrality is not None:
            centrality = accumulate(centrality, heads.sum(0), lam)
        keys.append(k[0])
        values.append(v[0])
        saliency.append(heads)
    return torch.stack(keys), torch.stack(values), torch.stack(saliency), h, centrality


class Refine(_Selection):
    """The second cut of a two-stage engine, after layer R: hidden ``[1, n, E]``, positions
    ``[n]``, the present tokens' centrality ``[n]`` and ``prompt_len`` (a ``[N]`` dummy: the
    budget is a fraction of the prompt) -> hidden ``[1, n'', E]``, positions ``[n'']`` with
    n'' = ceil(r_refine · N) + w: the same selection as :class:`Compact`, over fewer tokens."""

    def forward(self, hidden, positions, centrality, prompt_len):
        return compact(hidden, positions, self.keep(centrality, prompt_len.shape[0]))


class KVSelect(_Selection):
    """keys/values ``[l, G, n, D]``, saliency ``[l, G, n]``, positions ``[n]`` and the prompt
    length ``prompt_len`` (a ``[N]`` dummy whose length is N: budgets are fractions of N) ->
    kept keys/values ``[l, G, k + w, D]`` and their positions ``[l, G, k + w]``."""

    def forward(self, keys, values, saliency, positions, prompt_len):
        keep = self.keep(saliency, prompt_len.shape[0])  # [l, G, K]
        return gather_tokens(keys, keep), gather_tokens(values, keep), positions[keep]


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
        cos, sin = rope(self.model, positions[:, None], h.dtype)
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
        n_rep = self.model.config.num_attention_heads // g
        new_keys, new_values = [], []
        for index, layer in enumerate(layers):
            mask = base_mask
            window = sliding_window(layer)
            if window is not None:  # the new token (own position) is always near itself
                key_pos = torch.cat([pc[index], positions[:, None, None].expand(-1, g, 1)], 2)
                mask = decode_mask(positions, key_pos, window, n_rep, visible)

            def with_new_token(k, v, index=index):
                return torch.cat([kc[index], k], dim=2), torch.cat([vc[index], v], dim=2)

            h, k, v = decode_layer(layer, h, cos, sin, with_new_token, mask)
            new_keys.append(k[:, :, 0])
            new_values.append(v[:, :, 0])
        logits = final_logits(self.model, h[:, -1])
        return logits, torch.stack(new_keys), torch.stack(new_values)


def stage_modules(model, method) -> dict[str, torch.nn.Module]:
    """Every stage of an engine for ``method`` (a :class:`~structkv.methods.StructKV` with a
    fixed pivot), by graph name (:func:`graph_names`): what the exporter traces and the torch
    backend runs."""
    w, pooling, mode = method.window, method.pooling, method.pool_mode
    modules = {
        "pre_pivot": PrePivot(model, method.pivot, w, method.lam),
        "compact": Compact(method.r_struct, w, pooling, mode, method.chunk),
        "post_pivot": PostPivot(model, method.pivot + 1, w),
        "kv_select": KVSelect(method.r_kv, w, pooling, mode, method.chunk),
        "decode": DecodeStep(model),
    }
    if method.refine_layer is not None:
        r = method.refine_layer
        modules["post_pivot"] = PostPivotFolding(model, method.pivot, r, w, method.lam)
        modules["refine"] = Refine(method.r_refine, w, pooling, mode, method.chunk)
        modules["post_refine"] = PostPivot(model, r + 1, w)
    return {name: modules[name] for name in graph_names(method)}
