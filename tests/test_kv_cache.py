"""Paged KV cache: allocator invariants (hypothesis), data round trips, sizing, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from structkv.errors import StructKVError
from structkv.runtime.kv_cache import CacheFull, PagedKVCache

L, G, D = 3, 2, 4


def _tokens(rng, n, base):
    k = rng.standard_normal((L, G, n, D)).astype(np.float32)
    v = rng.standard_normal((L, G, n, D)).astype(np.float32)
    p = np.broadcast_to(np.arange(base, base + n), (L, G, n)).copy()
    return k, v, p


def _check_ownership(cache: PagedKVCache) -> None:
    owned = [b for q in cache.sequences() for b in cache.block_list(q)]
    assert len(owned) == len(set(owned)), "a block is owned by two sequences"
    assert set(owned).isdisjoint(cache._free), "a block is both owned and free"
    assert (
        len(owned) + cache.blocks_free == cache.num_blocks == cache.blocks_used + cache.blocks_free
    )
    for q in cache.sequences():
        assert len(cache.block_list(q)) == math.ceil(cache.length(q) / cache.block_size)


ops = st.lists(
    st.tuples(
        st.sampled_from(["admit", "append", "release"]), st.integers(0, 5), st.integers(0, 40)
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, block=st.integers(1, 8), blocks=st.integers(1, 24))
def test_random_admit_append_release_keeps_invariants(ops, block, blocks):
    cache = PagedKVCache(L, G, D, blocks, block)
    rng = np.random.default_rng(0)
    expected: dict[int, tuple] = {}  # what each sequence must read back
    for op, seq, n in ops:
        try:
            if op == "admit" and seq not in expected:
                k, v, p = _tokens(rng, n, 0)
                cache.admit(seq, n)
                cache.write(seq, k, v, p) if n else None
                expected[seq] = (k, v, p)
            elif op == "append" and seq in expected:
                k, v, p = _tokens(rng, 1, expected[seq][2].shape[2])
                cache.append(seq, k[:, :, 0], v[:, :, 0], int(p[0, 0, 0]))
                expected[seq] = tuple(
                    np.concatenate([a, b], axis=2) for a, b in zip(expected[seq], (k, v, p))
                )
            elif op == "release" and seq in expected:
                cache.release(seq)
                del expected[seq]
        except CacheFull:
            pass  # refused: nothing must have changed for the data we check below
        _check_ownership(cache)
        for q, (k, v, p) in expected.items():
            gk, gv, gp = cache.gather(q)
            assert np.array_equal(gk, k) and np.array_equal(gv, v) and np.array_equal(gp, p)
    for q in list(expected):
        cache.release(q)
    assert cache.blocks_free == cache.num_blocks and cache.sequences() == []


def test_admission_refuses_without_allocating():
    cache = PagedKVCache(L, G, D, num_blocks=4, block_size=16)
    cache.admit(0, 40)  # 3 blocks
    with pytest.raises(
        CacheFull, match=r"needs 2 KV blocks .* only 1 of 4 are free.*--kv-cache-mb"
    ):
        cache.admit(1, 20)
    assert cache.blocks_used == 3 and cache.sequences() == [0]
    with pytest.raises(CacheFull):  # reserve counts too
        cache.admit(1, 10, reserve=10)
    cache.admit(1, 16)
    cache.write(1, *_tokens(np.random.default_rng(1), 16, 0))  # fills its one block
    with pytest.raises(CacheFull, match="full"):
        cache.write(1, *_tokens(np.random.default_rng(1), 1, 16))
    assert cache.length(1) == 16 and cache.blocks_free == 0


def test_sizing_from_megabytes_by_hand():
    # one block: 2 (K,V) x 3 layers x 2 heads x 16 tokens x 4 dims x 4 bytes = 3072 bytes
    cache = PagedKVCache.from_megabytes(1, L, G, D, block_size=16)
    assert cache.num_blocks == 2**20 // 3072
    with pytest.raises(StructKVError, match="holds no block"):
        PagedKVCache.from_megabytes(0.001, L, G, D)


def test_compressed_prompt_occupies_fewer_blocks():
    n, w, new = 4096, 8, 32
    kept = math.ceil(0.1 * n) + w
    full, compressed = PagedKVCache(L, G, D, 400), PagedKVCache(L, G, D, 400)
    full.admit(0, n, reserve=new)
    compressed.admit(0, kept, reserve=new)
    assert full.blocks_used == n // 16
    assert compressed.blocks_used == math.ceil(kept / 16)  # 26 blocks instead of 256


def test_batch_tables_pad_and_report_lengths():
    cache = PagedKVCache(L, G, D, 10, block_size=4)
    cache.admit(7, 9)
    cache.admit(3, 2)
    tables, lengths = cache.batch_tables([7, 3])
    assert tables.tolist() == [[0, 1, 2], [3, 0, 0]] and lengths.tolist() == [0, 0]
    with pytest.raises(StructKVError, match="not in the KV cache"):
        cache.release(5)
