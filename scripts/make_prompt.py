#!/usr/bin/env python
"""Write a deterministic needle-in-a-haystack prompt sized in the embedded model's tokens.

Example: python scripts/make_prompt.py --length 2048 --depth 0.5 --out out/needle-2k.txt
The expected answer goes to stderr; the prompt (question after the context) to --out.
"""

import argparse
import sys
from pathlib import Path

from structkv.models import DEFAULT_MODEL, load
from structkv.prompts.needle import HAYSTACKS, make_needle_prompt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--depth", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", choices=HAYSTACKS, default="prose")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    needle = make_needle_prompt(
        load(args.model).tokenizer, args.length, args.depth, args.seed, haystack=args.haystack
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(needle.prompt, encoding="utf-8")
    print(f"wrote {out}; expected answer: {needle.answer}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
