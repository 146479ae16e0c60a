"""With every budget at 1.0 each method is the unmodified model (prefill and 20 decode steps)."""

from __future__ import annotations

import pytest
import torch
from reference import assert_matches_hf

from structkv.generate import decode_step
from structkv.methods import METHODS, get_method

FULL_BUDGET = {"r_kv": 1.0, "r_struct": 1.0}


def _method_at_full_budget(name):
    knobs = {k: v for k, v in FULL_BUDGET.items() if k in METHODS[name].knobs()}
    if name == "structkv":
        knobs["pivot"] = "online"
    return get_method(name, **knobs)


@pytest.mark.parametrize("name", [m for m in METHODS if m not in ("gemfilter", "pyramidkv")])
@torch.no_grad()
def test_full_budget_equals_unmodified_model(tiny, name):
    model = tiny.model
    ids = torch.randint(0, 256, (80,), generator=torch.Generator().manual_seed(11))
    out = _method_at_full_budget(name).prefill(model, ids, extra_capacity=20)
    assert_matches_hf(model, out.logits, lambda t: decode_step(model, out.cache, t), ids, 20)
