"""SnapKV: full prefill, then each layer keeps its own top-k salient tokens per KV head (§1, §5)."""

from __future__ import annotations

from dataclasses import dataclass

from structkv.methods.base import SaliencyKVMethod


@dataclass
class SnapKV(SaliencyKVMethod):
    """``r_kv`` · N tokens per layer and KV head by pooled window saliency, plus the window.
    No propagation: prefill compute is the full model's."""

    name = "snapkv"
