"""Prefill and decode benchmarks: medians after warm-up, ratios vs full taken in the same run.

Why interleaved rounds (every method once per round, then the next round): these machines are
noisy, and a drift in machine speed then hits all methods alike instead of biasing one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from structkv.errors import StructKVError
from structkv.knobs import add_method_args, count, method_knobs


def _prompt_ids(lm, length: int) -> torch.Tensor:
    """The needle prompt of ``length`` tokens (random ids for a model without a tokenizer: a
    random-weight model of a real shape, timed where its weights are absent), on the model's
    device."""
    device = next(lm.model.parameters()).device
    if lm.tokenizer is None:
        vocab = int(lm.model.config.vocab_size)
        g = torch.Generator().manual_seed(length)
        return torch.randint(0, vocab, (length,), generator=g).to(device)
    from structkv.generate import encode_prompt
    from structkv.prompts.needle import make_needle_prompt

    prompt = make_needle_prompt(lm.tokenizer, length, depth=0.5, seed=0).prompt
    return encode_prompt(lm.tokenizer, prompt, chat=bool(lm.tokenizer.chat_template)).to(device)


def _sync(lm) -> None:
    """Wait for queued device work, so a timer read afterwards measures it (CUDA is async)."""
    device = next(lm.model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _methods(lm, names: list[str], knobs: dict):
    from structkv.generate import as_method
    from structkv.methods import METHODS

    out = {}
    for name in names:
        if name not in METHODS:
            raise StructKVError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
        given = {k: v for k, v in knobs.items() if k in METHODS[name].knobs()}
        out[name] = as_method(name, lm.model_id, **given)
    return out


def _log(msg: str) -> None:
    print(f"[structkv bench] {msg}", file=sys.stderr, flush=True)


@torch.inference_mode()
def bench_prefill(
    lm, lengths, names, repeats=3, warmup=1, knobs=None, instances=None
) -> list[dict]:
    """Per length and method: median prefill seconds, speedup vs full (median of per-round
    ratios; the ratio of medians is reported too), and the centrality/pivot overhead.
    ``instances`` (label -> method, "full" among them) times configured methods instead of
    ``names`` with ``knobs`` (the frontier's budget settings)."""
    if repeats < 3:
        raise StructKVError("--repeats must be >= 3 (medians of fewer runs are noise)")
    if instances is not None:
        methods, names = dict(instances), list(instances)
    else:
        if "full" not in names:
            names = ["full", *names]
        methods = _methods(lm, names, knobs or {})
    rows = []
    for length in lengths:
        ids = _prompt_ids(lm, length)
        times = {n: [] for n in names}
        over = {n: [] for n in names}
        last = {}
        for rnd in range(warmup + repeats):
            for name, method in methods.items():
                _sync(lm)
                start = time.perf_counter()
                result = method.prefill(lm.model, ids)
                _sync(lm)
                elapsed = time.perf_counter() - start
                last[name] = result.stats
                if rnd >= warmup:
                    times[name].append(elapsed)
                    over[name].append(result.stats.overhead_s)
            _log(f"{length} tokens: round {rnd + 1}/{warmup + repeats}")
        for name in names:
            med = statistics.median(times[name])
            overhead = statistics.median(over[name])
            # Paired per round (full and the method ran back to back), then the median: robust
            # to the machine's speed drifting between rounds.
            paired = statistics.median(f / t for f, t in zip(times["full"], times[name]))
            rows.append(
                {
                    "length": int(ids.shape[0]),
                    "method": name,
                    "median_s": round(med, 4),
                    "runs_s": [round(t, 4) for t in times[name]],
                    "speedup_vs_full": round(paired, 3),
                    "ratio_of_medians": round(statistics.median(times["full"]) / med, 3),
                    "overhead_s": round(overhead, 4),
                    "overhead_pct": round(100 * overhead / med, 2),
                    "pivot_layer": last[name].pivot_layer,
                    "compute_fraction": round(last[name].compute_fraction, 4),
                }
            )
    return rows


@torch.inference_mode()
def bench_decode(lm, length, names, steps=32, repeats=3, knobs=None) -> list[dict]:
    """Decode tokens/s on each method's compressed cache at ``length`` context, vs full."""
    from structkv.generate import decode_step

    if "full" not in names:
        names = ["full", *names]
    methods = _methods(lm, names, knobs or {})
    ids = _prompt_ids(lm, length)
    caches, tokens, per_step = {}, {}, {n: [] for n in names}
    for name, method in methods.items():
        result = method.prefill(lm.model, ids, extra_capacity=(repeats + 1) * steps)
        caches[name], tokens[name] = result.cache, int(result.logits.argmax())
        _log(f"prefilled {name}")
    for rnd in range(repeats + 1):  # round 0 is the warm-up
        for name in names:
            for _ in range(steps):
                start = time.perf_counter()
                tokens[name] = int(decode_step(lm.model, caches[name], tokens[name]).argmax())
                if rnd > 0:
                    per_step[name].append(time.perf_counter() - start)
    full = statistics.median(per_step["full"])
    return [
        {
            "length": int(ids.shape[0]),
            "method": name,
            "median_step_s": round(statistics.median(per_step[name]), 5),
            "tokens_per_s": round(1 / statistics.median(per_step[name]), 2),
            "speedup_vs_full": round(full / statistics.median(per_step[name]), 3),
            "kv_tokens_layer0": caches[name].layers[0].length - (repeats + 1) * steps,
            "kv_bytes": caches[name].nbytes(),
        }
        for name in names
    ]


def bench_engines(
    engine_dirs: list[str],
    backend: str,
    lengths: list[int],
    repeats: int = 3,
    warmup: int = 1,
    steps: int = 0,
) -> list[dict]:
    """Engines side by side (e.g. StructKV vs a full-context export with R_struct = R_KV = 1),
    interleaved rounds in one run: prefill median seconds, or decode tokens/s when ``steps``.
    ``speedup_vs_last``: each engine against the LAST one listed (put the baseline last)."""
    from structkv.generate import encode_prompt
    from structkv.prompts.needle import make_needle_prompt
    from structkv.runtime.batch import Batch
    from structkv.runtime.engine import Engine

    engines = [Engine.load(d, backend=backend, verify=False) for d in engine_dirs]
    tok = engines[0].tokenizer
    rows = []
    for length in lengths:
        if tok is not None:
            prompt = make_needle_prompt(tok, length, depth=0.5, seed=0).prompt
            ids = encode_prompt(tok, prompt, chat=bool(tok.chat_template)).numpy()
        else:  # tiny test engines: random ids
            ids = torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(0))
            ids = ids.numpy()
        times: dict[int, list[float]] = {i: [] for i in range(len(engines))}
        kv_blocks: dict[int, int] = {}
        for round_ in range(warmup + repeats):
            for i, engine in enumerate(engines):
                if steps:
                    batch = Batch(engine)
                    seq, _ = batch.add(ids, steps + 1)
                    kv_blocks[i] = engine.cache.blocks_used
                    start = time.perf_counter()
                    for _ in range(steps):
                        batch.step()
                    elapsed = time.perf_counter() - start
                    batch.finish(seq)
                else:
                    start = time.perf_counter()
                    engine.prefill(ids)
                    elapsed = time.perf_counter() - start
                if round_ >= warmup:
                    times[i].append(elapsed)
        base = statistics.median(times[len(engines) - 1])
        for i, d in enumerate(engine_dirs):
            med = statistics.median(times[i])
            m = engines[i].manifest["method"]
            row = {"length": int(ids.shape[0]), "engine": d, "r_struct": m["r_struct"],
                   "r_kv": m["r_kv"]}  # fmt: skip
            if steps:
                row.update(tokens_per_s=round(steps / med, 2), speedup_vs_last=round(base / med, 3),
                           kv_blocks=kv_blocks[i])  # fmt: skip
            else:
                row.update(median_s=round(med, 3), speedup_vs_last=round(base / med, 3))
            rows.append(row)
    return rows


def format_rows(rows: list[dict], keys: list[str]) -> str:
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    lines = [" | ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join(lines)


def parse_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise StructKVError(f"expected comma-separated integers, got {text!r}") from None


def add_bench_parser(sub) -> None:
    from structkv.models import DEFAULT_MODEL, DTYPE_HELP

    b = sub.add_parser("bench", help="prefill / decode benchmarks (medians, ratios vs full)")
    which = b.add_subparsers(dest="what", required=True, parser_class=type(b))
    for name in ("prefill", "decode"):
        p = which.add_parser(name, help=f"{name} time per method (or per --engine), medians")
        p.add_argument("--model", default=DEFAULT_MODEL, help="model (default: the embedded one)")
        p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda")
        p.add_argument("--dtype", default="fp32", help=DTYPE_HELP)
        p.add_argument(
            "--methods",
            default="full,snapkv,fastkv,gemfilter,structkv",
            help="comma-separated methods (full is the baseline)",
        )
        p.add_argument("--repeats", type=count(1), default=3, help="timed runs (median)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        add_method_args(p)
        p.add_argument(
            "--engine",
            action="append",
            help="exported engine directory (repeat to compare; the last is the baseline)",
        )
        p.add_argument(
            "--backend",
            choices=("onnxruntime", "torch", "tensorrt"),
            default="onnxruntime",
            help="engine backend (with --engine; tensorrt: a --target tensorrt engine on a GPU)",
        )
        if name == "prefill":
            p.add_argument("--lengths", default="1024,4096", help="comma-separated prompt lengths")
            p.add_argument("--warmup", type=count(0), default=1, help="untimed runs first")
        else:
            p.add_argument("--length", type=count(1), default=4096, help="prompt length")
            p.add_argument("--steps", type=count(1), default=32, help="decode steps timed")
        p.set_defaults(func=main_from_args)


def main_from_args(args: argparse.Namespace) -> int:
    from structkv.models import load, torch_dtype

    if args.engine:
        prefill = args.what == "prefill"
        lengths = parse_ints(args.lengths) if prefill else [args.length]
        steps = 0 if prefill else args.steps
        rows = bench_engines(args.engine, args.backend, lengths, args.repeats, 1, steps)
        keys = ["length", "engine", "r_struct", "r_kv"] + (
            ["median_s", "speedup_vs_last"] if prefill else
            ["tokens_per_s", "speedup_vs_last", "kv_blocks"]
        )  # fmt: skip
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        if args.json:
            print(json.dumps({"bench": args.what, "backend": args.backend, "date": date,
                              "rows": rows}))  # fmt: skip
        else:
            print(f"# {args.what} engines ({args.backend}), {date}")
            print(format_rows(rows, keys))
        return 0

    knobs = method_knobs(args)
    names = [n for n in args.methods.split(",") if n]
    lm = load(args.model, dtype=torch_dtype(args.dtype), device=args.device)
    header = {
        "model": lm.model_id,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.what == "prefill":
        rows = bench_prefill(lm, parse_ints(args.lengths), names, args.repeats, args.warmup, knobs)
        keys = ["length", "method", "median_s", "speedup_vs_full", "ratio_of_medians",
                "overhead_pct", "pivot_layer", "compute_fraction"]  # fmt: skip
    else:
        rows = bench_decode(lm, args.length, names, args.steps, args.repeats, knobs)
        keys = ["length", "method", "tokens_per_s", "speedup_vs_full", "kv_tokens_layer0",
                "kv_bytes"]  # fmt: skip
    if args.json:
        print(json.dumps({**header, "bench": args.what, "rows": rows}))
    else:
        print(f"# {args.what}: {header['model']}, {header['threads']} threads, {header['date']}")
        print(format_rows(rows, keys))
    return 0
