#!/usr/bin/env python
"""Decode benchmark (same as `structkv bench decode`): tokens/s on compressed vs full KV.

Example: python scripts/bench_decode.py --length 4096 --methods full,structkv
"""

import sys

from structkv.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "decode", *sys.argv[1:]]))
