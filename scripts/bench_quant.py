#!/usr/bin/env python
"""Quantised engines (``structkv-export --quant``) against the fp32 engine, in one run (issue 17):
engine size, prefill seconds at ``--length`` (medians after a warm-up round, rounds alternate
engines), decode tokens/s at that context, fidelity to the fp32 engine (KL and top-1 agreement,
teacher-forced on the fp32 engine's own greedy continuation of needle prompts) and the RULER
quick profile's tasks scored through each engine.

Engines are exported into ``--workdir`` unless already there (same flags = same engine).

Example: python scripts/bench_quant.py --configs fp32,int8:32,int4:32 --workdir /tmp/qbench \
           --out docs/results/quant/smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def _engine_dir(workdir: Path, config: str, model: str, extra: list[str]) -> Path:
    """``fp32``, ``w8a8`` or ``int8:32`` / ``int4:64`` (quant:group), ``...:a0`` for products
    in fp32 (MatMulNBits accuracy_level 0 instead of the default int8 compute); a suffix
    ``@bf16`` exports with ``--attention structkv-bf16``."""
    from structkv.export.exporter import main as export

    out = workdir / config.replace(":", "-").replace("@", "-")
    if (out / "manifest.json").is_file():
        return out
    argv = ["--model", model, "--out", str(out), *extra]
    config, _, attention = config.partition("@")
    if attention:
        argv += ["--attention", f"structkv-{attention}"]
    if config == "w8a8":
        argv += ["--quant", "w8a8"]
    elif config != "fp32":
        quant, group, *level = config.split(":")
        argv += ["--quant", quant, "--group-size", group]
        argv += ["--quant-compute", "fp32"] if level == ["a0"] else []
    t = time.perf_counter()
    if export(argv) != 0:
        raise SystemExit(f"export of {config} failed")
    print(f"exported {config} in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _forced(engine, ids: np.ndarray, tokens: list[int]) -> np.ndarray:
    """Logits at every step of ``tokens`` fed to ``engine`` (teacher forcing): ``[T, V]``."""
    out = engine.prefill(ids)
    engine.admit(0, out, reserve=len(tokens) + 1)
    rows = [out.logits]
    try:
        for step, token in enumerate(tokens[:-1]):
            rows.append(engine.decode([0], [token], [len(ids) + step])[0])
    finally:
        engine.release(0)
    return np.stack(rows)


def _first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (None: equal)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                None if len(a) == len(b) else min(len(a), len(b)))  # fmt: skip


def _torch_greedy(model: str, dtype: str, engine, prompts, steps: int) -> list[list[int]]:
    """Greedy tokens of the torch path (``structkv generate --dtype``) with the engine's own
    method configuration."""
    import torch

    from structkv.generate import generate_ids
    from structkv.manifest import method_from_manifest
    from structkv.models import load, torch_dtype

    lm = load(model, torch_dtype(dtype))
    method = method_from_manifest(engine.manifest)
    eos = engine.eos_ids()
    return [
        generate_ids(lm.model, torch.from_numpy(ids), method, steps, eos_ids=eos).tokens
        for ids in prompts
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--configs", default="fp32,int8:32,int4:32", help="fp32 first")
    p.add_argument("--workdir", default="/tmp/structkv-quant-bench")
    p.add_argument("--length", type=int, default=4096, help="prefill / decode context")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--fidelity-prompts", type=int, default=3, help="needle prompts at 2K")
    p.add_argument("--fidelity-steps", type=int, default=32)
    p.add_argument("--tasks", default="niah_single_1,vt", help="RULER tasks (quick profile)")
    p.add_argument("--task-lengths", default="512", help="RULER lengths (quick profile)")
    p.add_argument("--samples", type=int, default=2, help="RULER samples (quick profile: 2)")
    p.add_argument("--export-args", default="", help="more structkv-export flags for every "
                   "engine, e.g. '--r-struct 1 --r-kv 1' (full context)")  # fmt: skip
    p.add_argument("--torch-dtypes", default="", help="also greedy-decode the fidelity prompts "
                   "with the torch path in these dtypes (e.g. fp32,bf16) and count, per engine, "
                   "the prompts whose greedy tokens equal torch's")  # fmt: skip
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()

    from structkv.eval.ruler import make_sample, score
    from structkv.generate import encode_prompt
    from structkv.prompts.needle import make_needle_prompt
    from structkv.runtime.batch import Batch
    from structkv.runtime.engine import Engine

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    configs = args.configs.split(",")
    extra = args.export_args.split()
    dirs = {c: _engine_dir(workdir, c, args.model, extra) for c in configs}
    engines = {c: Engine.load(d, verify=False, kv_cache_mb=256) for c, d in dirs.items()}
    base = configs[0]
    tok = engines[base].tokenizer
    rows = {c: {"engine": str(d), "bytes": _size(d)} for c, d in dirs.items()}
    for c in configs:
        rows[c]["size_vs_" + base] = round(rows[c]["bytes"] / rows[base]["bytes"], 4)
        rows[c]["quant"] = engines[c].manifest.get("quant")

    # prefill and decode at --length (rounds alternate engines; round 0 warms up)
    prompt = make_needle_prompt(tok, args.length, depth=0.5, seed=0).prompt
    ids = encode_prompt(tok, prompt, chat=True).numpy()
    prefill = {c: [] for c in configs}
    decode = {c: [] for c in configs}
    for i in range(args.repeats + 1):
        for c, engine in engines.items():
            t = time.perf_counter()
            engine.prefill(ids)
            took = time.perf_counter() - t
            batch = Batch(engine)
            seq, _ = batch.add(ids, args.decode_steps + 1)
            t = time.perf_counter()
            for _ in range(args.decode_steps):
                batch.step()
            tps = args.decode_steps / (time.perf_counter() - t)
            batch.finish(seq)
            if i:
                prefill[c].append(took)
                decode[c].append(tps)
        print(f"round {i} done", flush=True)
    for c in configs:
        rows[c]["prefill_s"] = round(statistics.median(prefill[c]), 3)
        rows[c]["decode_tok_s"] = round(statistics.median(decode[c]), 2)
        rows[c]["prefill_speedup_vs_" + base] = round(
            statistics.median(prefill[base]) / statistics.median(prefill[c]), 3
        )
        rows[c]["decode_speedup_vs_" + base] = round(
            statistics.median(decode[c]) / statistics.median(decode[base]), 3
        )

    # fidelity: teacher-forced on the fp32 engine's greedy continuation of needle prompts
    kl = {c: [] for c in configs}
    agree = {c: [] for c in configs}
    greedy = {c: [] for c in configs}
    prompts = []
    for seed in range(args.fidelity_prompts):
        text = make_needle_prompt(tok, 2048, depth=0.3 + 0.2 * seed, seed=100 + seed).prompt
        f_ids = encode_prompt(tok, text, chat=True).numpy()
        prompts.append(f_ids)
        for c in configs:
            greedy[c].append(engines[c].generate(f_ids, args.fidelity_steps)[0])
        tokens = greedy[base][-1]
        ref = _softmax(_forced(engines[base], f_ids, tokens))
        for c in configs:
            got = _forced(engines[c], f_ids, tokens)
            q = _softmax(got)
            kl[c].append(float(np.mean(np.sum(ref * (np.log(ref + 1e-30) - np.log(q + 1e-30)),
                                              -1))))  # fmt: skip
            agree[c].append(float(np.mean(got.argmax(-1) == ref.argmax(-1))))
    for c in configs:
        rows[c]["kl_vs_" + base] = round(statistics.mean(kl[c]), 5)
        rows[c]["top1_vs_" + base] = round(statistics.mean(agree[c]), 4)
    for name in filter(None, args.torch_dtypes.split(",")):
        ref = _torch_greedy(args.model, name, engines[base], prompts, args.fidelity_steps)
        for c in configs:
            same = [a == b for a, b in zip(greedy[c], ref, strict=True)]
            first = [_first_difference(a, b) for a, b in zip(greedy[c], ref, strict=True)]
            rows[c][f"greedy_equal_torch_{name}"] = f"{sum(same)}/{len(same)}"
            rows[c][f"greedy_first_difference_torch_{name}"] = first

    # RULER tasks through each engine (greedy, chat template, 32 new tokens)
    tasks = args.tasks.split(",")
    lengths = [int(x) for x in args.task_lengths.split(",")]
    for c, engine in engines.items():
        scores, answers = [], []
        for task in tasks:
            for length in lengths:
                for seed in range(args.samples):
                    sample = make_sample(task, tok, length, seed)
                    s_ids = encode_prompt(tok, sample.prompt, chat=True).numpy()
                    out, _ = engine.generate(s_ids, 32)
                    text = tok.decode(out, skip_special_tokens=True)
                    scores.append(score(sample, text))
                    answers.append(text)
        rows[c]["ruler_score"] = round(100 * statistics.mean(scores), 2)
        rows[c]["ruler_cases"] = len(scores)
        rows[c]["ruler_outputs"] = answers
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"onnxruntime {__import__('onnxruntime').__version__}",
        "command": "python scripts/bench_quant.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "prefill_tokens": int(ids.shape[0]),
        "ruler": {"tasks": tasks, "lengths": lengths, "samples": args.samples},
        "rows": rows,
    }
    for c in configs:
        r = rows[c]
        print(f"{c:10s} size {r['size_vs_' + base]:.3f}x  prefill {r['prefill_s']:.2f}s "
              f"({r['prefill_speedup_vs_' + base]:.2f}x)  decode {r['decode_tok_s']:.1f} tok/s  "
              f"KL {r['kl_vs_' + base]:.4f}  top1 {r['top1_vs_' + base]:.3f}  "
              f"RULER {r['ruler_score']:.1f}")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
