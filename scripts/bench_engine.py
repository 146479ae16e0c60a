#!/usr/bin/env python
"""Engine (ONNX Runtime) vs the torch reference of the same method, in one run (issue 4):
prefill seconds (and the engine's per-stage split) at each length, decode tokens/s at the
longest. Rounds alternate engine and torch; medians over ``--repeats`` after one warm-up round.

Example: python scripts/bench_engine.py --engine engine/ --lengths 1024,2048,4096 --out x.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from structkv.generate import decode_step, encode_prompt
from structkv.manifest import method_from_manifest
from structkv.models import load
from structkv.prompts.needle import make_needle_prompt
from structkv.runtime.batch import Batch
from structkv.runtime.engine import Engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()

    engine = Engine.load(args.engine, verify=False)
    lm = load(engine.manifest["model_id"])
    method = method_from_manifest(engine.manifest)
    rows = []
    lengths = [int(x) for x in args.lengths.split(",")]
    for length in lengths:
        prompt = make_needle_prompt(lm.tokenizer, length, depth=0.5, seed=0).prompt
        t_ids = encode_prompt(lm.tokenizer, prompt, chat=True)
        ids = t_ids.numpy()
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
        ort_med, torch_med = statistics.median(ort_s), statistics.median(torch_s)
        row = {
            "length": int(ids.shape[0]),
            "prefill_s": {"onnxruntime": ort_med, "torch": torch_med},
            "engine_stages_s": {k: statistics.median(s[k] for s in stages) for k in stages[0]},
            "prefill_speedup_ort_vs_torch": torch_med / ort_med,
        }
        if length == lengths[-1]:
            steps, ort_tps, torch_tps = args.decode_steps, [], []
            for i in range(args.repeats + 1):
                batch = Batch(engine)
                seq, _ = batch.add(ids, steps + 1)
                t = time.perf_counter()
                for _ in range(steps):
                    batch.step()
                a = steps / (time.perf_counter() - t)
                batch.finish(seq)
                ref = method.prefill(lm.model, t_ids, extra_capacity=steps + 1)
                t = time.perf_counter()
                for _ in range(steps):
                    decode_step(lm.model, ref.cache, 100)
                b = steps / (time.perf_counter() - t)
                if i:
                    ort_tps.append(a)
                    torch_tps.append(b)
            row["decode_tokens_per_s"] = {
                "onnxruntime": statistics.median(ort_tps),
                "torch": statistics.median(torch_tps),
            }
            row["decode_speedup_ort_vs_torch"] = statistics.median(ort_tps) / statistics.median(
                torch_tps
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "engine": args.engine,
        "attention": engine.manifest.get("attention", "onnx"),
        "providers": engine.stages.providers,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
