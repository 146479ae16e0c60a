#!/usr/bin/env python
"""Prefill benchmark (same as `structkv bench prefill`): full vs each method, medians + speedups.

Example: python scripts/bench_prefill.py --lengths 1024,4096 --methods full,fastkv,structkv
"""

import sys

from structkv.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "prefill", *sys.argv[1:]]))
