#!/usr/bin/env python
"""Per layer: which share of a needle's value tokens rank in the top R of pooled window saliency.

It shows from which layer on the needle is salient enough to survive a propagation budget R
(method.md §1 scores, max-pooled, window excluded), i.e. which pivots can keep it at all.

Example: python scripts/needle_salience.py --haystack prose --samples 3 --budget 0.2
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from structkv.generate import encode_prompt
from structkv.methods import SnapKV
from structkv.models import DEFAULT_MODEL, load
from structkv.prompts.needle import HAYSTACKS, make_needle_prompt, needle_token_positions
from structkv.saliency import pool_scores


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--haystack", choices=HAYSTACKS, default="prose")
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--window", type=int, default=8)
    args = p.parse_args()
    lm = load(args.model)
    per_layer: list[list[float]] = []
    for seed in range(args.samples):
        needle = make_needle_prompt(
            lm.tokenizer, args.length, (seed + 0.5) / args.samples, seed, haystack=args.haystack
        )
        ids = encode_prompt(lm.tokenizer, needle.prompt, chat=True)
        where = torch.tensor(needle_token_positions(lm.tokenizer, ids.tolist(), needle.answer))
        rows: list[float] = []

        def observe(view, rows=rows, where=where):
            s = pool_scores(view.saliency, 7, args.window)[: view.n - args.window]
            rank = (s[None, :] > s[where][:, None]).sum(1)
            rows.append(float((rank < args.budget * view.prompt_len).float().mean()))

        SnapKV(window=args.window).prefill(lm.model, ids, observer=observe)
        per_layer.append(rows)
    mean = [statistics.mean(col) for col in zip(*per_layer)]
    print(f"{args.haystack}: {args.samples} prompts, top {args.budget:.0%}, window {args.window}")
    print("layer: " + " ".join(f"{i:>4}" for i in range(len(mean))))
    print("share: " + " ".join(f"{m:4.2f}" for m in mean))
    return 0


if __name__ == "__main__":
    sys.exit(main())
