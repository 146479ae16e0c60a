"""Fidelity of a compressed prefill to full context on the same prompt (paper Figure 3).

Per layer: cosine similarity of the LAST prompt token's hidden state (always kept: it is in the
window) with full context's. At the end: KL(full || method) of the next-token distribution,
and teacher-forced greedy agreement over the next ``steps`` tokens of the full model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from structkv.generate import decode_step
from structkv.methods import Full, Method


@dataclass
class Fidelity:
    method: str
    layer_cosine: list[float]
    kl: float
    top1_agreement: float
    pivot_layer: int | None


def _last_hidden(model, ids, method: Method, extra: int):
    rows: list[torch.Tensor] = []
    result = method.prefill(
        model, ids, extra_capacity=extra, observer=lambda v: rows.append(v.hidden[0, -1])
    )
    return result, rows


@torch.inference_mode()
def fidelity(model, ids: torch.Tensor, methods: list[Method], steps: int = 16) -> list[Fidelity]:
    """Compare each method with full context on ``ids``."""
    full, full_rows = _last_hidden(model, ids, Full(), steps)
    tokens = [int(full.logits.argmax())]
    for _ in range(steps - 1):
        tokens.append(int(decode_step(model, full.cache, tokens[-1]).argmax()))
    p = torch.log_softmax(full.logits, -1)
    out = []
    for method in methods:
        result, rows = _last_hidden(model, ids, method, steps)
        cos = [float(torch.cosine_similarity(a, b, dim=0)) for a, b in zip(full_rows, rows)]
        q = torch.log_softmax(result.logits, -1)
        agree = [int(result.logits.argmax()) == tokens[0]]
        for i in range(1, steps):
            logits = decode_step(model, result.cache, tokens[i - 1])
            agree.append(int(logits.argmax()) == tokens[i])
        out.append(
            Fidelity(
                method.name,
                cos,
                float((p.exp() * (p - q)).sum()),
                sum(agree) / steps,
                result.stats.pivot_layer,
            )
        )
    return out
