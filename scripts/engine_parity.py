#!/usr/bin/env python
"""Engine parity on the embedded model (issue 4): ONNX Runtime engine vs the torch reference.

For prompts generated at 1K–4K (RULER-style, chat template), compares the engine's first-step
logits with the reference `structkv` prefill at the engine's pivot/λ (max |diff|) and the greedy
tokens of both for ``--new-tokens`` steps. Writes JSON (per prompt + summary) to ``--out``.

Example: python scripts/engine_parity.py --engine engine/ --out docs/results/engine/parity.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from structkv.eval.ruler import make_sample
from structkv.generate import encode_prompt, eos_token_ids, generate_ids
from structkv.manifest import method_from_manifest
from structkv.models import load
from structkv.runtime.engine import Engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--lengths", default="1024,2048,3072,4096")
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--tasks", default="niah_single_1,niah_single_2,vt,cwe,niah_multikey_1")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    engine = Engine.load(args.engine)
    lm = load(engine.manifest["model_id"])
    method = method_from_manifest(engine.manifest)
    eos = eos_token_ids(lm)
    lengths = [int(x) for x in args.lengths.split(",")]
    tasks = args.tasks.split(",")
    rows = []
    for i in range(args.prompts):
        length, task = lengths[i % len(lengths)], tasks[i % len(tasks)]
        sample = make_sample(task, lm.tokenizer, length, seed=100 + i)
        ids = encode_prompt(lm.tokenizer, sample.prompt, chat=True)
        t = time.perf_counter()
        ref_prefill = method.prefill(lm.model, ids)
        ref_tokens = generate_ids(lm.model, ids, method, args.new_tokens, eos_ids=eos).tokens
        t_ref = time.perf_counter() - t
        t = time.perf_counter()
        out = engine.prefill(ids.numpy())
        tokens, _ = engine.generate(ids.numpy(), args.new_tokens)
        t_eng = time.perf_counter() - t
        diff = float(np.abs(out.logits - ref_prefill.logits.numpy()).max())
        same_kv = all(
            np.array_equal(out.positions[l], lc.kept_positions().numpy())
            for l, lc in enumerate(ref_prefill.cache.layers)
        )
        rows.append(
            {
                "task": task,
                "tokens": int(ids.shape[0]),
                "logits_max_abs_diff": diff,
                "same_kept_positions": same_kv,
                "tokens_equal": tokens == ref_tokens,
                "engine_tokens": tokens,
                "reference_tokens": ref_tokens,
                "seconds_reference": round(t_ref, 2),
                "seconds_engine": round(t_eng, 2),
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if "tokens" not in k or k == "tokens"}))
    summary = {
        "prompts": len(rows),
        "tokens_equal": sum(r["tokens_equal"] for r in rows),
        "same_kept_positions": sum(r["same_kept_positions"] for r in rows),
        "max_logits_diff": max(r["logits_max_abs_diff"] for r in rows),
        "new_tokens": args.new_tokens,
        "engine": engine.manifest["method"] | {"dtype": engine.manifest["dtype"]},
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()} {platform.system()}, {_cores()} cores",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary))


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
