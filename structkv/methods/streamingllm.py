"""StreamingLLM: attention sinks plus the most recent tokens; KV only, no saliency."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from structkv.methods.base import Method
from structkv.prefill import LayerView
from structkv.selection import budget


@dataclass
class StreamingLLM(Method):
    """Keeps the first ``sinks`` tokens and the most recent ones, ``r_kv`` · N + window in all
    (the same total as the saliency methods), identically in every layer and head."""

    name = "streamingllm"
    needs_saliency = False

    r_kv: float = 0.1
    sinks: int = 4

    def select_kv(self, view: LayerView, state: object) -> torch.Tensor | None:
        n = view.n
        total = budget(self.r_kv, view.prompt_len) + self.window
        if total >= n:
            return None
        sinks = min(self.sinks, total)
        device = view.positions.device
        recent = torch.arange(n - (total - sinks), n, device=device)
        idx = torch.cat([torch.arange(sinks, device=device), recent])
        return idx.expand(view.num_kv_heads, -1)
