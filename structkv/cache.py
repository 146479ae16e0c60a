"""The compressed KV cache used for decoding: per layer, per KV head, its own kept tokens.

Why per head: §5 selects I_KV^(l,g) independently for each KV head g, with the same count for
every head of a layer, so one ``[1, G, T, D]`` tensor per layer holds it. Buffers are
preallocated for the decode budget (gpt-fast style) so appending a token copies nothing.
The generation loop lives elsewhere (:mod:`structkv.generate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from structkv.errors import StructKVError


@dataclass
class LayerCache:
    """K/V of one layer: ``k``/``v`` buffers ``[1, G, capacity, D]`` and ``positions``
    ``[G, capacity]`` (original token positions, for sliding-window masks and diagnostics)."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    length: int

    @classmethod
    def from_kept(cls, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, extra: int):
        g, t = positions.shape
        kb = k.new_empty(1, g, t + extra, k.shape[-1])
        vb = v.new_empty(1, g, t + extra, v.shape[-1])
        pb = positions.new_empty(g, t + extra)
        kb[:, :, :t], vb[:, :, :t], pb[:, :t] = k, v, positions
        return cls(kb, vb, pb, t)

    def append(self, k: torch.Tensor, v: torch.Tensor, position: int) -> None:
        """Write ``n`` tokens' K/V ``[1, G, n, D]`` (one in decode; several when a known answer
        is scored teacher-forced) into the next slots, in place, at original positions
        ``position``… ``position + n - 1``. The buffers never grow (a copy of the whole cache per
        overflow): size them with the prefill's ``extra_capacity``, as
        :func:`structkv.generate_ids` does with ``max_new_tokens``."""
        t, n = self.length, k.shape[2]
        if t + n > self.k.shape[2]:
            raise StructKVError(
                f"the decode cache is full ({self.k.shape[2]} slots); prefill with "
                "extra_capacity >= the number of tokens to decode"
            )
        self.k[:, :, t : t + n] = k
        self.v[:, :, t : t + n] = v
        if n == 1:
            self.positions[:, t] = position
        else:
            self.positions[:, t : t + n] = torch.arange(
                position, position + n, device=self.positions.device
            )
        self.length = t + n

    def keys(self) -> torch.Tensor:
        return self.k[:, :, : self.length]

    def values(self) -> torch.Tensor:
        return self.v[:, :, : self.length]

    def kept_positions(self) -> torch.Tensor:
        return self.positions[:, : self.length]


@dataclass
class CompressedKVCache:
    """All layers' caches plus the position the next decoded token takes."""

    layers: list[LayerCache]
    next_position: int

    def tokens_per_layer(self) -> list[int]:
        return [c.length for c in self.layers]

    def nbytes(self) -> int:
        """Bytes of live K/V (not the preallocated headroom)."""
        total = 0
        for c in self.layers:
            per_token = c.k.shape[1] * c.k.shape[3] * c.k.element_size()
            total += 2 * per_token * c.length
        return total
