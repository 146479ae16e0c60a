"""PyramidKV: SnapKV selection with a budget that shrinks linearly with depth."""

from __future__ import annotations

from dataclasses import dataclass

from structkv.methods.base import SaliencyKVMethod
from structkv.selection import budget


@dataclass
class PyramidKV(SaliencyKVMethod):
    """Per-layer budgets fall linearly from ``2k - k/beta`` (layer 0) to ``k/beta`` (last layer),
    where k = ``r_kv`` · N, so the total over layers equals SnapKV's (PyramidKV's beta = 20)."""

    name = "pyramidkv"

    beta: float = 20.0

    def kv_budget(self, layer: int, num_layers: int, n_prompt: int) -> int | None:
        k = budget(self.r_kv, n_prompt)
        low = k / self.beta
        high = 2 * k - low
        if num_layers == 1:
            return k
        return round(high - (high - low) * layer / (num_layers - 1))
