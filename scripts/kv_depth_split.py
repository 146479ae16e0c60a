#!/usr/bin/env python
"""Which layers' caches does a needle answer need? StructKV with one R_KV for the full-length
layers (up to and including the pivot) and another for the layers after it.

A diagnostic, not a product knob: engines keep one token count per layer (the paged cache), so
a split budget is a torch-path experiment here. It answers one question the RULER numbers
raise (docs/RESULTS.md, "Where R_KV 0.2 loses the needles"): when a smaller R_KV loses a needle
the propagated set still holds, is it the shallow layers' caches or the deep ones'?

    python scripts/kv_depth_split.py --task niah_multikey_1 --samples 10 \\
        --splits 0.5/0.5,0.2/0.2,0.5/0.2,0.2/0.5 --out docs/results/kv-depth/mk1-2k.json

Each split is ``shallow/deep``; every other knob is the shipped profile's unless given
(``--window``, ``--chunk``, ...). Prints accuracy, needle survival (propagated set; mean KV
survival of the shallow and deep layers) and the answers' tails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from structkv.eval.reports import _accuracy, _survival
from structkv.eval.ruler import TASKS
from structkv.generate import as_method
from structkv.knobs import add_method_args, method_knobs
from structkv.methods import StructKV
from structkv.models import DEFAULT_MODEL, load
from structkv.selection import budget


@dataclass
class SplitKV(StructKV):
    """StructKV whose layers after ``split_pivot`` keep ``r_kv_deep`` · N tokens per KV head;
    the others keep ``r_kv`` · N. The average KV fraction is reported, not a budget."""

    r_kv_deep: float = 0.1
    split_pivot: int = 0

    def kv_budget(self, layer: int, num_layers: int, n_prompt: int) -> int | None:
        return budget(self.r_kv_deep if layer > self.split_pivot else self.r_kv, n_prompt)


def parse_splits(text: str) -> list[tuple[float, float]]:
    out = []
    for part in text.split(","):
        shallow, _, deep = part.partition("/")
        try:
            pair = (float(shallow), float(deep))
        except ValueError:
            raise ValueError(f"--splits: {part!r} is not shallow/deep, e.g. 0.5/0.2") from None
        if not all(0.0 < x <= 1.0 for x in pair):
            raise ValueError(f"--splits: {part!r}: fractions must be in (0, 1]")
        out.append(pair)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--task", default="niah_multikey_1")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--splits", default="0.5/0.5,0.2/0.2,0.5/0.2,0.2/0.5")
    p.add_argument("--out", help="write the JSON result here")
    add_method_args(p)
    args = p.parse_args()
    if args.task not in TASKS or not args.task.startswith("niah_"):
        p.error(f"--task must be a needle task, got {args.task!r}")
    knobs = {k: v for k, v in method_knobs(args).items() if k != "r_kv"}
    try:
        splits = parse_splits(args.splits)
    except ValueError as e:
        p.error(str(e))
    torch.set_grad_enabled(False)
    lm = load(args.model)
    base = as_method(StructKV(**knobs), lm.model_id)
    if not isinstance(base.pivot, int):
        p.error("this diagnostic needs a fixed pivot: pass --pivot N or use a calibrated model")
    num_layers = lm.model.config.num_hidden_layers
    rows = []
    for shallow, deep in splits:
        start = time.perf_counter()
        fields = {k: v for k, v in base.to_dict().items() if k != "name"}
        fields.update(r_kv=shallow, r_kv_deep=deep, split_pivot=base.pivot)
        method = SplitKV(**fields)
        acc, gens = _accuracy(lm, method, args.task, args.length, args.samples, 0)
        survival = [_survival(lm, *g) for g in gens]
        layers = [statistics.mean(c) for c in zip(*[s["kv_per_layer"] for s in survival])]
        cut = base.pivot + 1
        row = {
            "r_kv_shallow": shallow,
            "r_kv_deep": deep,
            "kv_fraction": round((cut * shallow + (num_layers - cut) * deep) / num_layers, 4),
            "accuracy": acc,
            "propagated": statistics.mean(s["propagated"] for s in survival),
            "kv_shallow": statistics.mean(layers[:cut]),
            "kv_deep": statistics.mean(layers[cut:]),
            "kv_per_layer": [round(x, 4) for x in layers],
            "outputs": [lm.tokenizer.decode(g[2].tokens, skip_special_tokens=True) for g in gens],
            "answers": [g[0].answers for g in gens],
        }
        rows.append(row)
        print(
            f"R_KV {shallow}/{deep} (average {row['kv_fraction']}): accuracy {acc:.2f}, needle "
            f"kept: propagated {row['propagated']:.2f}, KV shallow {row['kv_shallow']:.2f}, "
            f"deep {row['kv_deep']:.2f} ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    result = {
        "model": lm.model_id,
        "task": args.task,
        "length": args.length,
        "samples": args.samples,
        "method": base.to_dict(),
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
