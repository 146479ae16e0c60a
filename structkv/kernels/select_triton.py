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

Chunk mode (``chunk`` > 1, span-preserving selection: whole chunks of c tokens, as
:func:`structkv.selection.topk_chunks_with_window` keeps them) reuses ``select_rows`` on chunk
keys: ``pool_keys`` writing the pooled floats instead of keys, ``chunk_keys`` (chunk means in
the torch path's exact arithmetic, one program per row), ``select_rows`` over the chunks (no
window), ``expand_chunks`` (the kept chunks' tokens, the remainder before the window, the
window).

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
def _pooled(base, offs, m, pool, avg, BLOCK: tl.constexpr):
    """The pooled scores at ``offs`` of one row of ``m`` candidates (-0.0 folded into +0.0)."""
    inside = offs < m
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
    return tl.where(acc == 0.0, 0.0, acc)  # -0.0 == +0.0 for the torch path's comparisons


@triton.jit
def _key(x):
    """The order-preserving int32 of a float32 (negative floats: magnitude order reversed)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def pool_keys(
    scores, keys, n, window, pool, avg, row_stride, key_stride, AS_KEYS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """keys[row, j] = order-preserving int32 of the pooled score j, for j < n - window; with
    ``AS_KEYS`` false, the pooled float32 itself (its bits in the int32 buffer): chunk mode's
    input, which needs the values to sum, not their order."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = n - window
    acc = _pooled(scores + row * row_stride, offs, m, pool, avg, BLOCK)
    out = _key(acc) if AS_KEYS else acc.to(tl.int32, bitcast=True)
    tl.store(keys + row * key_stride + offs, out, mask=offs < m)


@triton.jit
def chunk_keys(pooled, keys, chunk, whole, in_stride, key_stride):
    """keys[row, s] = order-preserving int32 of chunk s's mean, for s < whole, from the pooled
    float32 bits ``pool_keys`` wrote with ``AS_KEYS`` false: one program per row, in the torch
    path's arithmetic exactly. :func:`structkv.selection.
    topk_chunks_with_window` takes a chunk's mean as ``(prefix[e] - prefix[e - c]) / c`` of the
    float32 prefix sum, and torch's CPU cumsum adds float32 in a float64 accumulator in index
    order, rounding each prefix to float32; so this adds the same values in the same order
    (sequentially: a parallel scan rounds differently), subtracts in float32 and divides with
    IEEE rounding (``div_rn``)."""
    row = tl.program_id(0).to(tl.int64)
    base = pooled + row * in_stride
    size = chunk.to(tl.float32)
    total = tl.zeros([], dtype=tl.float64)
    start = tl.zeros([], dtype=tl.float32)
    for s in range(0, whole):
        for j in range(0, chunk):
            bits = tl.load(base + s * chunk + j)
            total += bits.to(tl.float32, bitcast=True).to(tl.float64)
        end = total.to(tl.float32)
        mean = tl.math.div_rn(end - start, size)
        start = end
        tl.store(keys + row * key_stride + s, _key(tl.where(mean == 0.0, 0.0, mean)))


@triton.jit
def expand_chunks(
    chunks, out, n, keep, chunk, whole, chunk_stride, out_stride, BLOCK: tl.constexpr
):  # fmt: skip
    """out[row, :]: the tokens of the ``keep`` kept chunks (their indices ascending in
    ``chunks``), then every token from ``whole * chunk`` on (the remainder and the window)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    chunked = keep * chunk
    count = chunked + n - whole * chunk
    inside = offs < count
    in_chunk = offs < chunked
    index = tl.load(chunks + row * chunk_stride + offs // chunk, mask=inside & in_chunk, other=0)
    first = index * chunk + (offs % chunk)
    tail = (whole * chunk + offs - chunked).to(tl.int64)
    tl.store(out + row * out_stride + offs, tl.where(in_chunk, first, tail), mask=inside)


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
    scores: torch.Tensor, k: int, window: int, pooling: int, pool_mode: str, chunk: int = 0
) -> torch.Tensor:
    """Same contract as :func:`structkv.selection.select_tokens`: ``scores`` ``[..., n]`` ->
    kept indices ``[..., selected_count(n, k, w, chunk)]`` (int64, ascending per row)."""
    if pool_mode not in ("max", "avg"):
        raise ValueError(f"pooling mode must be max or avg, got {pool_mode!r}")
    if pooling > 1 and pooling % 2 == 0:
        raise ValueError(f"pooling kernel must be odd, got {pooling}")
    *lead, n = scores.shape
    rows = scores.reshape(-1, n).float().contiguous()
    m = n - window
    if m < 1:
        raise ValueError(f"{n} scores leave no candidate outside the window of {window}")
    pool, avg = max(1, pooling), int(pool_mode == "avg")
    if chunk > 1:
        return _select_chunks(rows, k, window, pool, avg, chunk).reshape(*lead, -1)
    kk = max(0, min(k, m))
    keys = torch.empty(rows.shape[0], m, dtype=torch.int32, device=rows.device)
    out = torch.empty(rows.shape[0], kk + window, dtype=torch.int64, device=rows.device)
    pool_keys[(rows.shape[0], triton.cdiv(m, SELECT_BLOCK))](
        rows, keys, n, window, pool, avg, n, m, AS_KEYS=True, BLOCK=SELECT_BLOCK
    )  # fmt: skip
    select_rows[(rows.shape[0],)](keys, out, n, kk, window, m, kk + window, BLOCK=SELECT_BLOCK)
    return out.reshape(*lead, kk + window)


def _select_chunks(
    rows: torch.Tensor, k: int, window: int, pool: int, avg: int, chunk: int
) -> torch.Tensor:
    """Chunk mode (:func:`structkv.selection.topk_chunks_with_window`) on ``rows`` ``[R, n]``:
    pooled values (``pool_keys`` without the key mapping), chunk means as keys, the best
    ``keep`` chunks by ``select_rows`` (a row of ``whole`` chunk keys, no window), then their
    tokens plus the remainder and the window."""
    count_rows, n = rows.shape
    m = n - window
    whole = m // chunk
    rest = m - whole * chunk
    keep = min(whole, max(1, max(k - rest, 0) // chunk))
    count = keep * chunk + n - whole * chunk
    device = rows.device
    chosen = torch.empty(count_rows, max(keep, 1), dtype=torch.int64, device=device)
    if whole > 0:
        pooled = torch.empty(count_rows, m, dtype=torch.int32, device=device)  # float32 bits
        keys = torch.empty(count_rows, whole, dtype=torch.int32, device=device)
        pool_keys[(count_rows, triton.cdiv(m, SELECT_BLOCK))](
            rows, pooled, n, window, pool, avg, n, m, AS_KEYS=False, BLOCK=SELECT_BLOCK
        )  # fmt: skip
        chunk_keys[(count_rows,)](pooled, keys, chunk, whole, m, whole)
        select_rows[(count_rows,)](
            keys, chosen, whole, keep, 0, whole, chosen.shape[1], BLOCK=SELECT_BLOCK
        )  # fmt: skip
    out = torch.empty(count_rows, count, dtype=torch.int64, device=device)
    expand_chunks[(count_rows, triton.cdiv(count, SELECT_BLOCK))](
        chosen, out, n, keep, chunk, whole, chosen.shape[1], count, BLOCK=SELECT_BLOCK
    )  # fmt: skip
    return out


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
