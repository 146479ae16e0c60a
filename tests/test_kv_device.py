"""A device-resident KV pool (``Engine.load(kv_device=...)``): the decode graph reads the pool in
place through IOBinding and the new K/V are scattered into it on the device. Run here with
``kv_device="cpu"`` — the same code a GPU runs (scripts/gpu_check.py runs it on ``cuda``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import exported_engine

from structkv.errors import StructKVError
from structkv.runtime.batch import Batch
from structkv.runtime.engine import Engine


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return exported_engine("tiny-llama", "contrib", tmp_path_factory)


def _prompts(count: int) -> list[np.ndarray]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (90 + 37 * i,), generator=g).numpy() for i in range(count)]


def test_resident_pool_decodes_exactly_as_the_host_pool(engine_dir):
    """Batched greedy decoding on the resident pool == on the host numpy pool: tokens, and
    every sequence's cached K/V/positions afterwards (so the new K/V really went into the
    pool the next step read)."""
    host = Engine.load(engine_dir, kv_device=None, kv_cache_mb=4)
    resident = Engine.load(engine_dir, kv_device="cpu", kv_cache_mb=4)
    assert isinstance(resident.cache.keys, torch.Tensor) and isinstance(host.cache.keys, np.ndarray)
    prompts = _prompts(3)
    a, b = Batch(host), Batch(resident)
    seqs_a = [a.add(p, 12)[0] for p in prompts]
    seqs_b = [b.add(p, 12)[0] for p in prompts]
    for _ in range(10):
        a.step()
        b.step()
    for qa, qb in zip(seqs_a, seqs_b):
        for x, y in zip(host.cache.gather(qa), resident.cache.gather(qb)):
            np.testing.assert_allclose(x, y, atol=1e-5)
        assert a.finish(qa) == b.finish(qb)


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_a_decode_step_moves_bytes_proportional_to_the_batch_not_the_pool(engine_dir, batch):
    """Host<->device bytes of one decode step, counted by the pool's Transfers: token ids,
    positions, lengths and block-table rows up, the new slots' indices and positions up, the
    logits down — per sequence, whatever the pool's size (16 MiB and 64 MiB pools move the
    same bytes). Passing the pool through the host would move megabytes."""
    moved = {}
    for mb in (16, 64):
        engine = Engine.load(engine_dir, kv_device="cpu", kv_cache_mb=mb)
        batcher = Batch(engine)
        for p in _prompts(batch):
            batcher.add(p, 8)
        batcher.step()  # the first step after admission
        before = engine.cache.transfers.total
        batcher.step()
        moved[mb] = engine.cache.transfers.total - before
        width = max(len(engine.cache.block_list(q)) for q in engine.cache.sequences())
        vocab = engine.manifest["config"]["vocab_size"]
    per_seq = 4 * vocab + 8 * (3 + width) + 3 * 8  # logits; ids, position, length, table; slot
    assert 0 < moved[16] == moved[64] <= batch * per_seq, moved
    pool_bytes = engine.cache.keys.numel() * engine.cache.keys.element_size()
    assert moved[64] * 100 < pool_bytes


def test_kv_device_refusals(engine_dir):
    with pytest.raises(StructKVError, match="IOBinding; the torch backend keeps its own"):
        Engine.load(engine_dir, backend="torch", kv_device="cpu")
    with pytest.raises(StructKVError, match="unknown --device 'tpu'"):
        Engine.load(engine_dir, kv_device="tpu")
