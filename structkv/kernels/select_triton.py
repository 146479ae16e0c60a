"""StructKV's selection and gather as OpenAI Triton kernels: the one GPU implementation.

The same kernels run three ways: through Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, what CI runs against the torch path), JIT-compiled on a GPU, and
ahead-of-time compiled to sm_80 / sm_90 cubins that the TensorRT plugin (plugins_trt/) embeds
and launches on its stream (:mod:`structkv.kernels.aot`).

Why not TensorRT's TopK: it supports K <= 3840, and StructKV keeps ceil(0.2 N) + w tokens, past
3840 from N ~ 19K. Why not a sort: a row of 128K scores needs no order, only the k-th largest
value. So selection is three steps, exactly §4/§5 of method.md as :func:`structkv.selection.
select_tokens` computes them:

1. ``pool_keys``: pool the non-window scores (max or avg, odd kernel, stride 1, same padding:
   -inf for max, zeros counted for avg, the window never read) and map each pooled float to an
   int32 key with the same order (-0.0 folded into +0.0, as the float comparison treats them).
2. ``select_rows``: one program per row finds the kk-th largest key by bisection on the key bits
   (32 counting passes), then writes, in one ascending pass, every index whose key is larger
   plus the lowest-index ties until kk are kept (a stable descending sort's first kk), then the
   window's indices. kk = min(k, n - w); the output is ascending with no sort.
3. ``gather_rows``: copy the kept rows (hidden states, keys/values per KV head, positions).

Rows: one for the structural compaction (the centrality ``[N]``), ``layers x KV heads`` for KV
selection (saliency ``[l, G, n]``). NaN scores are not supported (the torch path's sort puts them
first; attention scores are finite).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SELECT_BLOCK = 1024
GATHER_BLOCK = 256
_INT32_MIN = -2147483648


@triton.jit
def pool_keys(
    scores, keys, n, window, pool, avg, row_stride, key_stride, BLOCK: tl.constexpr
):  # fmt: skip
    """keys[row, j] = order-preserving int32 of the pooled score j, for j < n - window."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = n - window
    inside = offs < m
    base = scores + row * row_stride
    half = pool // 2
    if avg != 0:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, pool):
            j = offs - half + i
            acc += tl.load(base + j, mask=inside & (j >= 0) & (j < m), other=0.0)
        acc = acc / pool.to(tl.float32)
    else:
        acc = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        for i in range(0, pool):
            j = offs - half + i
            v = tl.load(base + j, mask=inside & (j >= 0) & (j < m), other=float("-inf"))
            acc = tl.maximum(acc, v)
    acc = tl.where(acc == 0.0, 0.0, acc)  # -0.0 == +0.0 for the torch path's comparisons
    bits = acc.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse their magnitude order
    tl.store(keys + row * key_stride + offs, key, mask=inside)


@triton.jit
def select_rows(keys, out, n, k, window, key_stride, out_stride, BLOCK: tl.constexpr):
    """out[row, :kk + window]: the kept indices of one row, ascending."""
    row = tl.program_id(0).to(tl.int64)
    m = n - window
    kk = tl.minimum(k, m)
    base = keys + row * key_stride
    dest = out + row * out_stride
    # Bisection on the key as an unsigned 32-bit value (int64 arithmetic): the largest t with
    # count(key >= t) >= kk is the kk-th largest key.
    lo = tl.zeros([], dtype=tl.int64)
    hi = tl.zeros([], dtype=tl.int64) + 4294967295
    for _ in range(0, 32):
        mid = lo + (hi - lo + 1) // 2
        count = tl.zeros([], dtype=tl.int32)
        for start in range(0, m, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < m
            key = tl.load(base + offs, mask=valid, other=0).to(tl.int64) + 2147483648
            count += tl.sum((valid & (key >= mid)).to(tl.int32), axis=0)
        lo = tl.where(count >= kk, mid, lo)
        hi = tl.where(count >= kk, hi, mid - 1)
    greater = tl.zeros([], dtype=tl.int32)
    for start in range(0, m, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < m
        key = tl.load(base + offs, mask=valid, other=0).to(tl.int64) + 2147483648
        greater += tl.sum((valid & (key > lo)).to(tl.int32), axis=0)
    ties_wanted = kk - greater
    kept = tl.zeros([], dtype=tl.int32)
    ties = tl.zeros([], dtype=tl.int32)
    for start in range(0, m, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < m
        key = tl.load(base + offs, mask=valid, other=0).to(tl.int64) + 2147483648
        tie = (valid & (key == lo)).to(tl.int32)
        tie_rank = ties + tl.cumsum(tie, axis=0) - tie  # ties before this one
        take = (valid & (key > lo)) | ((tie != 0) & (tie_rank < ties_wanted))
        t = take.to(tl.int32)
        slot = kept + tl.cumsum(t, axis=0) - t
        tl.store(dest + slot, offs.to(tl.int64), mask=take)
        kept += tl.sum(t, axis=0)
        ties += tl.sum(tie, axis=0)
    for start in range(0, window, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(dest + kk + offs, (m + offs).to(tl.int64), mask=offs < window)


@triton.jit
def gather_rows(
    src, index, dst, count, width, src_group_stride, index_group_stride, BLOCK: tl.constexpr
):  # fmt: skip
    """dst[g, i, :] = src[g, index[g, i], :] for rows of ``width`` elements (contiguous)."""
    pid = tl.program_id(0).to(tl.int64)
    group = pid // count
    i = pid % count
    row = tl.load(index + group * index_group_stride + i)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    values = tl.load(src + group * src_group_stride + row * width + cols, mask=ok)
    tl.store(dst + (group * count + i) * width + cols, values, mask=ok)


# -- torch-facing wrappers (the interpreter on CPU tensors, or a GPU) ----------------------------
def select_tokens(
    scores: torch.Tensor, k: int, window: int, pooling: int, pool_mode: str
) -> torch.Tensor:
    """Same contract as :func:`structkv.selection.select_tokens`: ``scores`` ``[..., n]`` ->
    kept indices ``[..., min(k, n - w) + w]`` (int64, ascending per row)."""
    if pool_mode not in ("max", "avg"):
        raise ValueError(f"pooling mode must be max or avg, got {pool_mode!r}")
    if pooling > 1 and pooling % 2 == 0:
        raise ValueError(f"pooling kernel must be odd, got {pooling}")
    *lead, n = scores.shape
    rows = scores.reshape(-1, n).float().contiguous()
    m = n - window
    if m < 1:
        raise ValueError(f"{n} scores leave no candidate outside the window of {window}")
    kk = max(0, min(k, m))
    keys = torch.empty(rows.shape[0], m, dtype=torch.int32, device=rows.device)
    out = torch.empty(rows.shape[0], kk + window, dtype=torch.int64, device=rows.device)
    pool_keys[(rows.shape[0], triton.cdiv(m, SELECT_BLOCK))](
        rows, keys, n, window, max(1, pooling), int(pool_mode == "avg"), n, m,
        BLOCK=SELECT_BLOCK,
    )  # fmt: skip
    select_rows[(rows.shape[0],)](keys, out, n, kk, window, m, kk + window, BLOCK=SELECT_BLOCK)
    return out.reshape(*lead, kk + window)


def gather_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`structkv.selection.gather_tokens`: ``x`` ``[..., n, D]``, ``keep``
    ``[..., K]`` (same leading dims) -> ``[..., K, D]``."""
    *lead, n, d = x.shape
    count = keep.shape[-1]
    src = x.reshape(-1, n, d).contiguous()
    index = keep.reshape(-1, count).contiguous()
    groups = src.shape[0]
    dst = torch.empty(groups, count, d, dtype=x.dtype, device=x.device)
    grid = (groups * count, triton.cdiv(d, GATHER_BLOCK))
    gather_rows[grid](src, index, dst, count, d, n * d, count, BLOCK=GATHER_BLOCK)
    return dst.reshape(*lead, count, d)


def gather_positions(positions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``positions[keep]`` for a shared ``[n]`` position vector and ``keep`` ``[..., K]``."""
    count = keep.shape[-1]
    index = keep.reshape(-1, count).contiguous()
    groups = index.shape[0]
    dst = torch.empty(groups, count, 1, dtype=positions.dtype, device=positions.device)
    src = positions.contiguous()
    grid = (groups * count, 1)
    gather_rows[grid](src, index, dst, count, 1, 0, count, BLOCK=GATHER_BLOCK)
    return dst.reshape(*keep.shape)
