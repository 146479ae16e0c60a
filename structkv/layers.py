"""Layer-by-layer forward over a Hugging Face Llama/Qwen2/Mistral model's own modules.

Why our own loop instead of ``model(...)``: StructKV changes the token set *between* layers
(structural propagation keeps original position ids on a shorter sequence) and needs each layer's
post-RoPE queries and keys for the window saliency. Reusing the HF submodules (norms,
projections, MLP, rotary table) keeps the arithmetic identical to the unmodified model, which the
tests check to 1e-4. The layer's own attention stays SDPA: the N x N matrix is never built.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


def num_layers(model) -> int:
    return len(model.model.layers)


def head_dims(model) -> tuple[int, int, int]:
    """(query heads H, KV heads G, head dim D)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_attention_heads, cfg.num_key_value_heads, head_dim


def rope(model, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[b, n, D]`` for arbitrary (original, possibly gapped) positions ``[n]``
    (then b = 1) or ``[b, n]`` (a decode batch)."""
    ref = torch.empty(0, dtype=dtype, device=positions.device)
    return model.model.rotary_emb(ref, positions if positions.dim() == 2 else positions[None])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, as the HF Llama family applies it; ``x`` is ``[B, heads, n, D]``."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, G, n, D]`` -> ``[B, G*n_rep, n, D]`` so each query head sees its group's KV head."""
    if n_rep == 1:
        return x
    b, g, n, d = x.shape
    return x[:, :, None].expand(b, g, n_rep, n, d).reshape(b, g * n_rep, n, d)


def sliding_window(layer) -> int | None:
    """The layer's sliding attention window, if any (Qwen2 per layer, Mistral per config)."""
    attn = layer.self_attn
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)


def visibility_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None
) -> torch.Tensor:
    """Boolean ``[n_q, n_k]``: key j is visible to query t iff pos_j <= pos_t (and inside the
    sliding window). Built from positions, so it is right for compacted, gapped sequences too."""
    diff = q_pos[:, None] - k_pos[None, :]
    mask = diff >= 0
    if window is not None:
        mask &= diff < window
    return mask


def needs_explicit_mask(positions: torch.Tensor, window: int | None) -> bool:
    return window is not None and int(positions.max() - positions.min()) >= window


def qkv(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Post-RoPE q ``[B,H,n,D]`` and k, v ``[B,G,n,D]`` for the normalised input ``x``."""
    attn = layer.self_attn
    b, n, _ = x.shape
    d = attn.head_dim
    q = attn.q_proj(x).view(b, n, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, -1, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, n, -1, d).transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


_EXPLICIT_ATTENTION = [False]


@contextmanager
def explicit_attention():
    """Within: :func:`attend` spells attention as MatMul / Softmax instead of SDPA.

    Why: SDPA exports as ONNX's ``Attention`` operator, which TensorRT builds only where it has
    a dedicated kernel (fp16/bf16, no padding mask): TensorRT-RTX refuses every fp32 graph and
    the masked decode step. The explicit form is plain operators any TensorRT builds (and
    fuses); ``structkv-export --attention explicit`` traces under this."""
    _EXPLICIT_ATTENTION[0] = True
    try:
        yield
    finally:
        _EXPLICIT_ATTENTION[0] = False


def explicit_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` as MatMul, mask, Softmax (in fp32), MatMul."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    elif is_causal:
        n, m = q.shape[-2], k.shape[-2]
        rows = torch.arange(n, device=q.device)[:, None] + (m - n)
        scores = scores.masked_fill(torch.arange(m, device=q.device)[None, :] > rows, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def attend(
    layer,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
) -> torch.Tensor:
    """SDPA over (possibly cached) k/v, then the output projection."""
    attn = layer.self_attn
    n_rep = q.shape[1] // k.shape[1]
    sdpa = explicit_sdpa if _EXPLICIT_ATTENTION[0] else F.scaled_dot_product_attention
    o = sdpa(
        q,
        repeat_kv(k, n_rep),
        repeat_kv(v, n_rep),
        attn_mask=mask,
        is_causal=causal and mask is None,
        scale=attn.scaling,
    )
    b, _, n, _ = q.shape
    return attn.o_proj(o.transpose(1, 2).reshape(b, n, -1))


def prefill_layer(layer, h: torch.Tensor, positions: torch.Tensor, cos, sin, traced: bool = False):
    """One decoder layer over a whole (maybe compacted) sequence sorted by position.

    Returns the new hidden state and this layer's post-RoPE q, k, v. Causal order follows the
    sorted order, which equals position order because sequences are always kept sorted.
    ``traced`` (ONNX export): a sliding-window layer always builds its mask, since whether it is
    needed depends on the data.
    """
    x = layer.input_layernorm(h)
    q, k, v = qkv(layer, x, cos, sin)
    window = sliding_window(layer)
    mask = None
    if window is not None and (traced or needs_explicit_mask(positions, window)):
        mask = visibility_mask(positions, positions, window)
    h = h + attend(layer, q, k, v, mask, causal=True)
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, q, k, v


def decode_mask(
    position: torch.Tensor,
    key_positions: torch.Tensor,
    window: int,
    n_rep: int,
    visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sliding-window mask for one new query per sequence: ``position`` ``[B]``, the original
    positions of the keys ``[B, G, T]`` (each KV head its own tokens), optional slot validity
    ``[B, T]`` (paged cache) -> ``[B, H, 1, T]``, True where a key is attended."""
    near = position[:, None, None] - key_positions < window
    if visible is not None:
        near = near & visible[:, None, :]
    return near.repeat_interleave(n_rep, dim=1)[:, :, None]


def decode_layer(layer, h: torch.Tensor, cos, sin, with_new_token, mask: torch.Tensor | None):
    """One decoder layer for new tokens after a cache: one per sequence in decode (``h``
    ``[B, 1, E]``), or a known answer's ``n`` tokens at once (``[1, n, E]``, with a ``mask``
    that makes them causal; :func:`structkv.generate.forced_logits`).

    ``with_new_token(k, v)`` returns the keys/values to attend over *including* the new token's:
    the torch cache writes it into its preallocated buffer and returns views, the decode graph
    concatenates it to the gathered pages. Returns the new hidden state and the token's k, v.
    """
    q, k, v = qkv(layer, layer.input_layernorm(h), cos, sin)
    keys, values = with_new_token(k, v)
    h = h + attend(layer, q, keys, values, mask, causal=False)
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, k, v


def final_logits(model, h_last: torch.Tensor) -> torch.Tensor:
    """Logits for the given hidden rows only (the LM head is the largest matmul at 49K vocab)."""
    return model.lm_head(model.model.norm(h_last)).float()
