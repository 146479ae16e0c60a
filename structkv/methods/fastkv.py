"""FastKV: token-selective propagation from ONE fixed layer's saliency, then §5 KV selection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from structkv.errors import StructKVError
from structkv.methods.base import SaliencyKVMethod
from structkv.prefill import LayerView
from structkv.selection import budget


@dataclass
class FastKV(SaliencyKVMethod):
    """After ``tsp_layer`` (default floor(L/2), the last full-length layer) only ``r_struct`` · N
    tokens by that layer's pooled saliency, plus the window, run on. No centrality, no pivot."""

    name = "fastkv"

    r_struct: float = 0.2
    tsp_layer: int | None = None

    def begin(self, num_layers: int, n_prompt: int) -> object:
        layer = num_layers // 2 if self.tsp_layer is None else self.tsp_layer
        if not 0 <= layer < num_layers - 1:
            raise StructKVError(
                f"tsp_layer must be a layer in [0, {num_layers - 2}] (a full-length layer with "
                f"one after it) for this {num_layers}-layer model, got {layer}; pass --tsp-layer "
                "in that range"
            )
        return layer

    def propagate(self, view: LayerView, state: object) -> torch.Tensor | None:
        if view.layer != state:
            return None
        return self.select(view.saliency, budget(self.r_struct, view.prompt_len))
