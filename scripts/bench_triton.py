#!/usr/bin/env python
"""Latency of one streaming request through Triton (``structkv deploy triton``), next to the
same request through ``structkv serve`` and the engine called in-process, in one run.

    python scripts/bench_triton.py --engine /tmp/eng --out docs/results/triton/latency.json

One prompt (a needle question of --prompt-tokens in the chat template, sent as text), greedy,
--max-tokens. Each path gets one warm-up request, then --repeats measured ones, one at a time;
reported are medians of time to first token (TTFT: request sent -> first streamed text), the
total time and the mean inter-token time after the first token. In-process, TTFT is the
engine's prefill time (its own clock). Every path must produce the same text (checked).
Needs the Triton environment (``python scripts/make_peer_env.py .venv-triton --extra
tritonserver``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: {what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"error: {what} was not ready in 180 s")


def _stream(url: str, body: dict, text_of) -> tuple[float, float, int, str]:
    """POST a streaming request; (ttft, total, text events, text) from the client's clock."""
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    start = time.perf_counter()
    first, parts = None, []
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            piece = text_of(json.loads(line[6:]))
            if piece:
                first = first or time.perf_counter()
                parts.append(piece)
    total = time.perf_counter() - start
    return first - start, total, len(parts), "".join(parts)


def _summary(runs: list[tuple[float, float, int, str]], tokens: int) -> dict:
    ttft = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    return {
        "ttft_s": round(ttft, 4),
        "total_s": round(total, 4),
        "inter_token_s": round((total - ttft) / max(1, tokens - 1), 4),
        "runs": [[round(r[0], 4), round(r[1], 4)] for r in runs],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True, help="engine directory (structkv-export)")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args()

    from structkv.prompts.needle import make_needle_prompt
    from structkv.runtime.batch import Batch
    from structkv.runtime.engine import Engine
    from structkv.runtime.triton_deploy import write_repository

    engine = Engine.load(args.engine, kv_cache_mb=256)
    tok = engine.tokenizer
    question = make_needle_prompt(tok, args.prompt_tokens, 0.5, seed=3, haystack="noise").prompt
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(prompt, add_special_tokens=True)["input_ids"]
    results: dict[str, dict] = {}

    # in-process: the engine alone (what both servers wrap)
    runs = []
    for i in range(args.repeats + 1):
        start = time.perf_counter()
        tokens, stats = Batch(engine).generate_one(ids, args.max_tokens, engine.eos_ids())
        total = time.perf_counter() - start
        text = tok.decode(tokens, skip_special_tokens=True)
        if i:  # the first is the warm-up
            runs.append((stats["prefill_s"], total, len(tokens), text))
    reference = runs[0][3]
    n_tokens = runs[0][2]
    results["in-process engine"] = _summary(runs, n_tokens)

    with tempfile.TemporaryDirectory() as tmp:
        # Triton (decoupled Python backend, generate_stream)
        repo = write_repository(args.engine, Path(tmp) / "repo", kv_cache_mb=256)
        http, grpc, metrics = _free_port(), _free_port(), _free_port()
        launcher = str(ROOT / "scripts" / "triton_server.sh")
        proc = subprocess.Popen(
            [launcher, str(repo), str(http), str(grpc), str(metrics)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            _wait(f"http://127.0.0.1:{http}/v2/health/ready", proc, "tritonserver")
            url = f"http://127.0.0.1:{http}/v2/models/structkv/generate_stream"
            body = {"text_input": prompt, "max_tokens": args.max_tokens, "stream": True}
            runs = [
                _stream(url, body, lambda e: e.get("text_output")) for _ in range(args.repeats + 1)
            ][1:]
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        assert all(r[3] == reference for r in runs), "Triton's text differs from the engine's"
        results["Triton generate_stream"] = _summary(runs, n_tokens)

        # structkv serve (OpenAI completions, stream)
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "structkv.cli", "serve", "--engine", args.engine,
             "--port", str(port), "--kv-cache-mb", "256", "--served-model-name", "bench"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _wait(f"http://127.0.0.1:{port}/health", proc, "structkv serve")
            url = f"http://127.0.0.1:{port}/v1/completions"
            body = {"model": "bench", "prompt": prompt, "max_tokens": args.max_tokens,
                    "temperature": 0, "stream": True}  # fmt: skip
            runs = [
                _stream(url, body, lambda e: (e.get("choices") or [{}])[0].get("text"))
                for _ in range(args.repeats + 1)
            ][1:]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        assert all(r[3] == reference for r in runs), "structkv serve's text differs"
        results["structkv serve (OpenAI)"] = _summary(runs, n_tokens)

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "command": " ".join(["python", *sys.argv]),
        "engine": str(Path(args.engine).resolve()),
        "model_id": engine.manifest.get("model_id"),
        "prompt_tokens": len(ids),
        "max_tokens": args.max_tokens,
        "generated_tokens": n_tokens,
        "repeats": args.repeats,
        "results": results,
    }
    print("| path | TTFT (s) | total (s) | inter-token (s) |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ttft_s']:.3f} | {r['total_s']:.3f} | {r['inter_token_s']:.4f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
