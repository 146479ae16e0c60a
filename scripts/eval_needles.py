#!/usr/bin/env python
"""Needle accuracy of each method on N deterministic ~2K-token prompts, with survival stats.

For every method: correct answers, the pivot layer(s) chosen, λ, and the fraction of needle
tokens (the value's digits) that survive into the propagated set and into the KV cache
(averaged over layers and heads). Prompts use the chat template, question after the context,
>= 24 new tokens. Calibration never sees these prompts (it uses generic prose tasks).

Example: python scripts/eval_needles.py --haystack prose --out docs/needles-prose.json

Held-out check (your own haystack and wording, never in the repository):
python scripts/eval_needles.py --haystack-file my.txt --needle 'The code for {key} is {value}.'
--question 'What is the code for {key}?' --methods full,structkv
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from structkv.generate import as_method, encode_prompt, eos_token_ids, generate_ids
from structkv.knobs import add_method_args, method_knobs
from structkv.methods import METHODS as METHOD_CLASSES
from structkv.models import DEFAULT_MODEL, load
from structkv.prompts.haystack import paragraphs
from structkv.prompts.needle import (
    HAYSTACKS,
    NEEDLE,
    QUESTION,
    check_templates,
    make_needle_prompt,
    needle_token_positions,
)

METHODS = "full,snapkv,fastkv,gemfilter,structkv-paper,structkv"


def kv_survival(out, needle: set[int]) -> float:
    """Mean over layers and KV heads of the fraction of needle tokens kept (prompt part)."""
    fractions = []
    # GemFilter's re-run restarts positions at 0: map them back to the original prompt.
    original = out.stats.propagated_positions if out.stats.method == "gemfilter" else None
    for layer in out.cache.layers:
        for head in layer.kept_positions().tolist():
            kept = {original[p] for p in head if p < len(original)} if original else set(head)
            fractions.append(len(needle & kept) / len(needle))
    return sum(fractions) / len(fractions)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--haystack", choices=HAYSTACKS, default="prose")
    p.add_argument(
        "--haystack-file", help="your own prose (paragraphs split at blank lines) for the haystack"
    )
    p.add_argument("--needle", default=NEEDLE, help="needle wording with {key} and {value}")
    p.add_argument("--question", default=QUESTION, help="question wording with {key}")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--out", help="write the JSON result here")
    add_method_args(p)  # --window, --chunk, --r-kv, ...: given to every method that has the knob
    args = p.parse_args()
    given = method_knobs(args)
    if args.haystack_file and args.haystack != "prose":
        p.error("--haystack-file replaces the prose haystack: drop --haystack noise")
    try:
        check_templates(args.needle, args.question)
        if args.haystack_file:
            paragraphs(args.haystack_file)
    except (OSError, ValueError) as e:
        p.error(str(e))
    unknown = [m for m in args.methods.split(",") if m not in METHOD_CLASSES]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {sorted(METHOD_CLASSES)}")

    lm = load(args.model)
    tok = lm.tokenizer
    depths = [(i + 0.5) / args.samples for i in range(args.samples)]
    prompts = [
        make_needle_prompt(
            tok,
            args.length,
            d,
            seed=i,
            haystack=args.haystack,
            haystack_file=args.haystack_file,
            needle=args.needle,
            question=args.question,
        )
        for i, d in enumerate(depths)
    ]
    results = {}
    for name in args.methods.split(","):
        own = METHOD_CLASSES[name].knobs()
        method = as_method(name, lm.model_id, **{k: v for k, v in given.items() if k in own})
        rows = []
        for needle in prompts:
            ids = encode_prompt(tok, needle.prompt, chat=True)
            positions = set(needle_token_positions(tok, ids.tolist(), needle.answer))
            out = generate_ids(
                lm.model, ids, method, args.max_new_tokens, eos_ids=eos_token_ids(lm)
            )
            text = tok.decode(out.tokens, skip_special_tokens=True)
            propagated = set(out.stats.propagated_positions or range(len(ids)))
            rows.append(
                {
                    "seed": needle.seed,
                    "depth": round(needle.depth, 3),
                    "tokens": len(ids),
                    "correct": needle.answer in text,
                    "answer": needle.answer,
                    "output": text,
                    "pivot_layer": out.stats.pivot_layer,
                    "lambda": out.stats.lam,
                    "propagated_survival": len(positions & propagated) / len(positions),
                    "kv_survival": kv_survival(out, positions),
                    "prefill_s": round(out.stats.prefill_s, 3),
                }
            )
        pivots = sorted({r["pivot_layer"] for r in rows if r["pivot_layer"] is not None})
        results[name] = {
            "correct": sum(r["correct"] for r in rows),
            "samples": len(rows),
            "pivot_layers": pivots,
            "lambda": rows[0]["lambda"],
            "propagated_survival": round(
                statistics.mean(r["propagated_survival"] for r in rows), 3
            ),
            "kv_survival": round(statistics.mean(r["kv_survival"] for r in rows), 3),
            "config": method.to_dict(),
            "rows": rows,
        }
        r = results[name]
        print(
            f"{name:<15} {r['correct']}/{r['samples']}  pivot {pivots or '-'}  λ {r['lambda']}  "
            f"needle kept: propagated {r['propagated_survival']:.2f}, KV {r['kv_survival']:.2f}",
            flush=True,
        )
    doc = {
        "model": lm.model_id,
        "haystack": args.haystack_file or args.haystack,
        "needle": args.needle,
        "question": args.question,
        "length": args.length,
        "knobs": given,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": torch.get_num_threads(),
        "results": results,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
