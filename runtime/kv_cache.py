"""Paged KV cache: a block pool shared by all sequences, one block table per sequence.

Why one table serves every layer and head: StructKV keeps the same *number* of tokens in every
layer and KV head (each its own tokens), so token slot ``i`` of a sequence lives at the same
(block, offset) everywhere; only the contents differ. A compressed prompt therefore really
occupies ``ceil((R_KV·N + w + new tokens) / block_size)`` blocks instead of ``ceil(N / ...)``.

The pool is ``[L, blocks, G, block_size, D]`` for K and for V, plus the original position of
every slot for sliding-window masks; the decode graph gathers it by block table itself. On the
host it is plain numpy, which ONNX Runtime's CPU provider reads without copies. With
``device`` set (``"cuda:0"``, or ``"cpu"`` to run the same code here) it is allocated once as
torch tensors on that device: the decode graph reads it in place through ONNX Runtime's
IOBinding and the new K/V are scattered into it there, so a decode step moves only O(batch)
bytes between host and device (token ids, positions, block-table rows, logits), counted by
:class:`Transfers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from structkv.errors import StructKVError

DEFAULT_BLOCK_SIZE = 16


class CacheFull(StructKVError):
    """A request does not fit in the free blocks; the message says how many it needs."""


@dataclass
class _Sequence:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # token slots filled (per layer and head)


@dataclass
class Transfers:
    """Bytes the runtime moved between host and a device-resident pool (``device`` set):
    every upload and download goes through :meth:`upload` / :meth:`download`."""

    host_to_device: int = 0
    device_to_host: int = 0

    def upload(self, array, device):
        import torch

        array = np.ascontiguousarray(array)
        self.host_to_device += array.nbytes
        return torch.from_numpy(array).to(device)

    def download(self, tensor) -> np.ndarray:
        self.device_to_host += tensor.element_size() * tensor.numel()
        return tensor.cpu().numpy()

    @property
    def total(self) -> int:
        return self.host_to_device + self.device_to_host


class PagedKVCache:
    """Block pool + allocator with a free list; ``admit`` / ``append`` / ``release``."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        dtype=np.float32,
        device: str | None = None,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise StructKVError(
                f"the KV cache needs at least one block of at least one token, got {num_blocks} "
                f"blocks of {block_size}; raise --kv-cache-mb"
            )
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        self.dtype = np.dtype(dtype)
        self.device = device
        self.transfers = Transfers()
        if device is None:
            self.keys = np.zeros(shape, dtype=dtype)
            self.values = np.zeros(shape, dtype=dtype)
            self.positions = np.zeros(shape[:4], dtype=np.int64)
        else:
            import torch

            from structkv.models import check_device

            self.device = str(check_device(device))
            t = torch.from_numpy(np.zeros((), dtype=dtype)).dtype
            self.keys = torch.zeros(shape, dtype=t, device=self.device)
            self.values = torch.zeros(shape, dtype=t, device=self.device)
            self.positions = torch.zeros(shape[:4], dtype=torch.int64, device=self.device)
        # Pop from the end: low block ids are handed out first, which keeps tests readable.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._seqs: dict[int, _Sequence] = {}

    @classmethod
    def from_megabytes(
        cls,
        megabytes: float,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        dtype=np.float32,
        device: str | None = None,
    ) -> PagedKVCache:
        """As many blocks as fit in ``megabytes`` of K + V (``--kv-cache-mb``)."""
        per_block = 2 * num_layers * num_kv_heads * block_size * head_dim * np.dtype(dtype).itemsize
        num_blocks = int(megabytes * 2**20 // per_block)
        if num_blocks < 1:
            raise StructKVError(
                f"--kv-cache-mb {megabytes} holds no block (one block is "
                f"{per_block / 2**20:.3f} MiB); raise --kv-cache-mb"
            )
        return cls(num_layers, num_kv_heads, head_dim, num_blocks, block_size, dtype, device)

    # -- counters -----------------------------------------------------------------------------
    @property
    def blocks_free(self) -> int:
        return len(self._free)

    @property
    def blocks_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def sequences(self) -> list[int]:
        return list(self._seqs)

    def length(self, seq: int) -> int:
        return self._seq(seq).length

    def block_list(self, seq: int) -> list[int]:
        return list(self._seq(seq).blocks)

    # -- allocation ---------------------------------------------------------------------------
    def admit(self, seq: int, tokens: int, reserve: int = 0) -> None:
        """Register ``seq`` with room for ``tokens`` slots now (and check ``reserve`` more fit).

        Refuses, without allocating anything, a request the free blocks cannot hold."""
        if seq in self._seqs:
            raise StructKVError(f"sequence {seq} is already in the KV cache")
        need = self.blocks_needed(tokens + reserve)
        if need > self.blocks_free:
            raise CacheFull(
                f"request needs {need} KV blocks ({tokens} + {reserve} tokens, block size "
                f"{self.block_size}) but only {self.blocks_free} of {self.num_blocks} are free; "
                "raise --kv-cache-mb, lower --max-new-tokens or wait for running requests"
            )
        self._seqs[seq] = _Sequence()
        self._grow(self._seqs[seq], tokens)

    def _grow(self, s: _Sequence, tokens: int) -> None:
        need = self.blocks_needed(tokens) - len(s.blocks)
        if need > len(self._free):
            raise CacheFull(
                f"the KV cache is full ({self.num_blocks} blocks of {self.block_size} tokens); "
                "raise --kv-cache-mb or lower --max-new-tokens"
            )
        for _ in range(need):
            s.blocks.append(self._free.pop())

    def release(self, seq: int) -> None:
        """Return a finished or cancelled sequence's blocks to the free list."""
        s = self._seqs.pop(seq, None)
        if s is None:
            raise StructKVError(f"sequence {seq} is not in the KV cache")
        self._free.extend(reversed(s.blocks))

    def _seq(self, seq: int) -> _Sequence:
        s = self._seqs.get(seq)
        if s is None:
            raise StructKVError(f"sequence {seq} is not in the KV cache")
        return s

    # -- data ---------------------------------------------------------------------------------
    def _slots(self, s: _Sequence, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.arange(start, start + count)
        return np.asarray(s.blocks, dtype=np.int64)[idx // self.block_size], idx % self.block_size

    def write(self, seq: int, keys, values, positions) -> None:
        """Append ``n`` slots to every layer: ``keys``/``values`` ``[L, G, n, D]``, positions
        ``[L, G, n]`` (each layer and head its own kept tokens, the same count everywhere)."""
        s = self._seq(seq)
        n = keys.shape[2]
        self._grow(s, s.length + n)
        blocks, offsets = self._slots(s, s.length, n)
        if self.device is not None:  # a prompt's K/V onto the device: once per request
            up = self.transfers.upload
            keys, values = up(keys, self.device), up(values, self.device)
            positions = up(np.asarray(positions, dtype=np.int64), self.device)
            blocks, offsets = up(blocks, self.device), up(offsets, self.device)
            self._scatter(blocks, offsets, keys.movedim(2, 0), values.movedim(2, 0),
                          positions.movedim(2, 0))  # fmt: skip
        else:
            # [L, G, n, D] -> slots: pool[:, block, :, offset] is [L, G, D] per slot
            self.keys[:, blocks, :, offsets] = np.moveaxis(keys, 2, 0)
            self.values[:, blocks, :, offsets] = np.moveaxis(values, 2, 0)
            self.positions[:, blocks, :, offsets] = np.moveaxis(positions, 2, 0)
        s.length += n

    def _scatter(self, blocks, offsets, keys, values, positions) -> None:
        """Device pool: slot-major ``[n, L, G, (D)]`` values into their (block, offset)."""
        self.keys[:, blocks, :, offsets] = keys
        self.values[:, blocks, :, offsets] = values
        self.positions[:, blocks, :, offsets] = positions

    def append_batch(self, seqs: list[int], keys, values, positions: list[int]) -> None:
        """One decoded token for each of ``seqs``: ``keys``/``values`` ``[L, B, G, D]``, on the
        pool's device when it has one (the decode graph's outputs stay there)."""
        if self.device is None:
            for i, (seq, position) in enumerate(zip(seqs, positions)):
                self.append(seq, keys[:, i], values[:, i], position)
            return
        slots = []
        for seq in seqs:
            s = self._seq(seq)
            self._grow(s, s.length + 1)
            slots.append((s.blocks[s.length // self.block_size], s.length % self.block_size))
            s.length += 1
        where = self.transfers.upload(np.asarray(slots, dtype=np.int64).T, self.device)
        pos = self.transfers.upload(np.asarray(positions, dtype=np.int64), self.device)
        layers, _, heads, _ = keys.shape
        pos = pos[:, None, None].expand(len(seqs), layers, heads)
        self._scatter(where[0], where[1], keys.movedim(1, 0), values.movedim(1, 0), pos)

    def append(self, seq: int, key, value, position: int) -> None:
        """One decoded token for every layer and head: ``key``/``value`` ``[L, G, D]``."""
        self.write(
            seq,
            key[:, :, None],
            value[:, :, None],
            np.full((*key.shape[:2], 1), position, dtype=np.int64),
        )

    def gather(self, seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The sequence's K, V ``[L, G, n, D]`` and positions ``[L, G, n]`` (a copy)."""
        s = self._seq(seq)
        blocks, offsets = self._slots(s, 0, s.length)
        if self.device is not None:
            get = self.transfers.download
            k, v, p = (get(t[:, blocks, :, offsets]) for t in (self.keys, self.values,
                                                                self.positions))  # fmt: skip
            return np.moveaxis(k, 0, 2), np.moveaxis(v, 0, 2), np.moveaxis(p, 0, 2)
        k = np.moveaxis(self.keys[:, blocks, :, offsets], 0, 2)
        v = np.moveaxis(self.values[:, blocks, :, offsets], 0, 2)
        p = np.moveaxis(self.positions[:, blocks, :, offsets], 0, 2)
        return k, v, p

    def batch_tables(self, seqs: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Block tables ``[B, max_blocks]`` (padded with block 0) and lengths ``[B]``."""
        tables = [self._seq(q).blocks for q in seqs]
        width = max(1, max(len(t) for t in tables))
        out = np.zeros((len(seqs), width), dtype=np.int64)
        for i, t in enumerate(tables):
            out[i, : len(t)] = t
        return out, np.asarray([self._seq(q).length for q in seqs], dtype=np.int64)
