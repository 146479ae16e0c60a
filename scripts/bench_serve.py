#!/usr/bin/env python
"""Load generator for `structkv serve`: throughput, TTFT and inter-token latency per concurrency,
for several engines in one run, each behind its own live server with the same --kv-cache-mb.

    python scripts/bench_serve.py --engine /tmp/eng-sk --engine /tmp/eng-full \
        --kv-cache-mb 1024 --out docs/results/serve/serve.json

Per engine and concurrency c: c streaming chat requests start together (prompts of
--prompt-tokens, greedy, --max-tokens each); the client timestamps every content chunk.
Reported: aggregate output tokens/s over the level, the steady-state batched decode rate (tokens
per second while all c requests are decoding: after the last first token, before the first
request ends), TTFT and inter-token latency p50/p99, and the single-stream step time (c = 1).
Admission: one --admission-tokens request's KV promise (blocks, from the server's /health while
it runs) and how many such requests the pool admits before queueing (blocks_total // promise).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from structkv.prompts.needle import make_needle_prompt


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engine: str, kv_cache_mb: float) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "structkv.cli",
        "serve",
        "--engine",
        engine,
        "--port",
        str(port),
        "--kv-cache-mb",
        str(kv_cache_mb),
        "--served-model-name",
        "bench",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "StructKV serving" in line:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, f"http://127.0.0.1:{port}"
    raise SystemExit(f"server for {engine} did not start")


def stream(url: str, prompt: str, max_tokens: int) -> list[float]:
    """Timestamps of the request's start and of each content chunk."""
    body = json.dumps(
        {
            "model": "bench",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stop": [],
        }
    ).encode()
    req = urllib.request.Request(
        url + "/v1/chat/completions", body, {"content-type": "application/json"}
    )
    times = [time.perf_counter()]
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    times.append(time.perf_counter())
    return times


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def level(url: str, prompts: list[str], max_tokens: int) -> dict:
    start_t = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        runs = list(pool.map(lambda p: stream(url, p, max_tokens), prompts))
    wall = time.perf_counter() - start_t
    ttft = [r[1] - r[0] for r in runs if len(r) > 1]
    itl = [b - a for r in runs for a, b in zip(r[1:], r[2:])]
    first_done = min(r[-1] for r in runs)
    all_started = max(r[1] for r in runs)
    in_window = sum(1 for r in runs for t in r[2:] if all_started < t <= first_done)
    window = first_done - all_started
    return {
        "concurrency": len(prompts),
        "output_tokens": sum(len(r) - 1 for r in runs),
        "wall_s": round(wall, 3),
        "throughput_tok_s": round(sum(len(r) - 1 for r in runs) / wall, 2),
        "decode_tok_s_all_running": round(in_window / window, 2) if window > 0 else None,
        "ttft_p50_s": round(pct(ttft, 0.5), 4),
        "ttft_p99_s": round(pct(ttft, 0.99), 4),
        "itl_p50_s": round(pct(itl, 0.5), 4),
        "itl_p99_s": round(pct(itl, 0.99), 4),
    }


def admission(url: str, prompt: str, max_tokens: int) -> dict:
    """One request's KV promise, read from /health while it runs, and the pool's capacity."""
    seen = {}
    thread = threading.Thread(target=stream, args=(url, prompt, max_tokens))
    thread.start()
    while thread.is_alive():
        health = json.loads(urllib.request.urlopen(url + "/health").read())
        if health["running"] == 1:
            seen = health
        time.sleep(0.05)
    thread.join()
    return {
        "blocks_per_request": seen["blocks_promised"],
        "blocks_total": seen["blocks_total"],
        "admitted_before_queueing": seen["blocks_total"] // seen["blocks_promised"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", action="append", required=True, help="engine directory (repeat)")
    p.add_argument("--kv-cache-mb", type=float, default=1024, help="the same pool for every engine")
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated levels")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length per request")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--admission-tokens", type=int, default=4096, help="prompt for admission")
    p.add_argument("--out", required=True, help="JSON results file")
    args = p.parse_args()
    from transformers import AutoTokenizer

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": vars(args),
        "engines": {},
    }
    for engine in args.engine:
        tok = AutoTokenizer.from_pretrained(Path(engine) / "tokenizer")
        levels = [int(c) for c in args.concurrency.split(",")]
        prompts = [
            make_needle_prompt(tok, args.prompt_tokens, 0.5, seed=i, haystack="noise").prompt
            for i in range(max(levels))
        ]
        big = make_needle_prompt(tok, args.admission_tokens, 0.5, seed=99, haystack="noise")
        proc, url = start(engine, args.kv_cache_mb)
        try:
            stream(url, prompts[0], 4)  # warm-up
            rows = [level(url, prompts[:c], args.max_tokens) for c in levels]
            adm = admission(url, big.prompt, args.max_tokens)
        finally:
            proc.terminate()
            proc.wait(60)
        single = rows[0]["itl_p50_s"]
        for row in rows:
            row["decode_speedup_vs_single"] = (
                round(row["decode_tok_s_all_running"] * single, 2)
                if row["decode_tok_s_all_running"]
                else None
            )
        report["engines"][engine] = {
            "levels": rows,
            "admission": adm,
            "single_stream_step_s": single,
        }
        print(json.dumps({engine: report["engines"][engine]}, indent=1), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
