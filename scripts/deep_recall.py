"""Does a label-free "deep recall" order the cheap settings as the needles do? (docs/RESULTS.md,
"The capped calibration's own budgets at 2K").

The candidate objective: of the tokens the full model's deep layers attend to most (the top 2 %
of the summed window saliency of layers ``--deep-from``..L-1, attention sinks and the window left
out), the share a setting's propagated set keeps. It needs no answer and no label, so a
calibration could score it on any prose. Before building it into the calibration, this script
asks whether it can work at all: it scores the settings on the evaluation's own needle prompts,
where the needle accuracies of some settings are measured, and prints them ranked. If even there
it does not rank them as the needles do, it cannot on calibration prose either.

    python scripts/deep_recall.py [--samples 4] [--deep-from 20] [--cap 0.55]
"""

from __future__ import annotations

import argparse

import torch

from structkv.calibration import _record, accumulate, compute_fraction
from structkv.eval.ruler import make_sample
from structkv.generate import encode_prompt
from structkv.methods import StructKV
from structkv.models import load
from structkv.selection import budget

TASKS = ("niah_single_2", "niah_multikey_1", "niah_multivalue")
WINDOW, SINKS = 8, 4


def deep_recall(saliency: list[torch.Tensor], n: int, pivot: int, lam: float, r_struct: float,
                chunk: int, deep_from: int) -> float:  # fmt: skip
    """The share of the deep layers' most attended tokens that the propagated set keeps."""
    c = None
    for s in saliency[: pivot + 1]:
        c = accumulate(c, s, lam)
    method = StructKV(r_struct=r_struct, r_kv=0.1, window=WINDOW, pooling=7, chunk=chunk, pivot=0)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[method.select(c, budget(r_struct, n))] = True
    deep = sum(s.float() for s in saliency[deep_from:]).clone()
    deep[n - WINDOW :] = 0  # the window is always kept
    deep[:SINKS] = 0  # attention sinks: every setting keeps them, they would swamp the share
    top = deep.topk(max(1, n // 50)).indices
    return float(kept[top].float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4, help="prompts per task (seeds 0..n-1)")
    ap.add_argument("--deep-from", type=int, default=20, help="first 'deep' layer")
    ap.add_argument("--cap", type=float, default=0.55, help="largest compute fraction scored")
    ap.add_argument("--chunk", type=int, default=8)
    args = ap.parse_args()
    lm = load("smollm2-135m")
    layers = len(lm.model.model.layers)
    settings = [
        (p, lam, rs)
        for p in range(6, 13)
        for lam in (0.0, 0.1, 0.3)
        for rs in (0.2, 0.3)
        if compute_fraction(p, layers, rs) <= args.cap + 1e-9
    ]
    totals = dict.fromkeys(settings, 0.0)
    prompts = 0
    for task in TASKS:
        for seed in range(args.samples):
            sample = make_sample(task, lm.tokenizer, 2048, seed)
            ids = encode_prompt(lm.tokenizer, sample.prompt, True)
            saliency = _record(lm.model, ids, 0.1, WINDOW, 7, 1).record.saliency
            for key in settings:
                totals[key] += deep_recall(saliency, int(ids.shape[0]), *key, args.chunk,
                                           args.deep_from)  # fmt: skip
            prompts += 1
    print(f"{prompts} needle prompts at 2K ({', '.join(TASKS)}), chunk {args.chunk}, deep "
          f"layers {args.deep_from}..{layers - 1}")  # fmt: skip
    print("pivot  lambda  R_struct  compute  deep recall")
    for p, lam, rs in sorted(settings, key=lambda k: -totals[k]):
        print(f"{p:<6} {lam:<7} {rs:<9} {compute_fraction(p, layers, rs):.3f}    "
              f"{totals[(p, lam, rs)] / prompts:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
