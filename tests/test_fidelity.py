"""Fidelity vs full context: exact where the computation is identical, lower after compaction."""

from __future__ import annotations

import pytest
import torch

from structkv.eval.fidelity import fidelity
from structkv.methods import GemFilter, SnapKV, StructKV


def test_fidelity_tracks_where_compression_starts(tiny_llama):
    ids = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(1))
    methods = [
        StructKV(pivot=2, r_struct=1.0, r_kv=1.0),
        StructKV(pivot=2, r_struct=0.2),
        SnapKV(r_kv=0.1),
        GemFilter(),
    ]
    same, skv, snap, gem = fidelity(tiny_llama.model, ids, methods, steps=6)
    assert same.layer_cosine == pytest.approx([1.0] * 6, abs=1e-5)
    assert same.kl == pytest.approx(0.0, abs=1e-5) and same.top1_agreement == 1.0
    # Layers up to the pivot run on every token: identical. After it, fewer tokens: different.
    assert skv.layer_cosine[:3] == pytest.approx([1.0] * 3, abs=1e-5)
    assert max(skv.layer_cosine[3:]) < 0.9999 and skv.kl > 0
    # SnapKV's prefill is the full model's; only decoding sees the smaller cache.
    assert snap.layer_cosine == pytest.approx([1.0] * 6, abs=1e-5) and snap.kl < 1e-5
    assert gem.layer_cosine[0] < 0.9999  # the re-run sees a different sequence from layer 0
