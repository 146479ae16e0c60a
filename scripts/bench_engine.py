#!/usr/bin/env python
"""Engine vs torch reference, same method, one run (issue 4): prefill seconds per stage and
decode tokens/s at one context length. Medians over ``--repeats`` after one warm-up.

Example: python scripts/bench_engine.py --engine engine/ --length 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from structkv.generate import decode_step
from structkv.methods import StructKV
from structkv.models import load
from structkv.runtime.engine import Engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=20)
    args = p.parse_args()

    engine = Engine.load(args.engine, verify=False)
    m = engine.manifest["method"]
    lm = load(engine.manifest["model_id"])
    method = StructKV(
        r_struct=m["r_struct"], r_kv=m["r_kv"], window=m["window"], pooling=m["pooling"],
        pool_mode=m["pool_mode"], lam=m["lambda"], pivot=m["pivot"],
    )  # fmt: skip
    ids = np.random.default_rng(0).integers(100, 10000, args.length)
    t_ids = torch.from_numpy(ids)
    ort_s, torch_s, stages = [], [], []
    for i in range(args.repeats + 1):  # round 0 warms both up
        t = time.perf_counter()
        out = engine.prefill(ids)
        a = time.perf_counter() - t
        t = time.perf_counter()
        method.prefill(lm.model, t_ids)
        b = time.perf_counter() - t
        if i:
            ort_s.append(a)
            torch_s.append(b)
            stages.append(out.stats["timings"])

    steps = args.decode_steps
    seq, _ = engine.add_request(ids, steps + 1)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    ort_tps = steps / (time.perf_counter() - t)
    engine.finish(seq)
    ref = method.prefill(lm.model, t_ids, extra_capacity=steps + 1)
    t = time.perf_counter()
    for _ in range(steps):
        decode_step(lm.model, ref.cache, 100)
    torch_tps = steps / (time.perf_counter() - t)

    result = {
        "length": args.length,
        "prefill_s": {"onnxruntime": statistics.median(ort_s), "torch": statistics.median(torch_s)},
        "engine_stages_s": {k: statistics.median(s[k] for s in stages) for k in stages[0]},
        "prefill_speedup_ort_vs_torch": statistics.median(torch_s) / statistics.median(ort_s),
        "decode_tokens_per_s": {"onnxruntime": ort_tps, "torch": torch_tps},
        "providers": engine.stages.providers,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
