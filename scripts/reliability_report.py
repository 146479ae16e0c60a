#!/usr/bin/env python
"""Run the reliability suite (tests/test_reliability_*.py) and write docs/RELIABILITY.md from
its own records: per class, the cases tried, how many were handled as specified, and every one
that was not, with why. One command regenerates it:

    python scripts/reliability_report.py          (or: make reliability)

``--from-log FILE`` rebuilds the page from a saved log without running the suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["tests/test_reliability_inputs.py", "tests/test_reliability_engine.py",
           "tests/test_reliability_export.py", "tests/test_reliability_server.py"]  # fmt: skip
WHAT = {
    "CLI knobs": "every numeric knob at and beyond its bounds (NaN, ±inf, 0, negative, huge, "
    "fractional, not a number), hypothesis-generated; one `error:` line naming the knob, exit 2",
    "CLI prompts": "empty / whitespace / non-UTF-8 / binary / directory / missing prompt files; "
    "prompts at exactly the engine's and the model's limit and one over, the window's minimum "
    "and one under",
    "CLI names": "unknown method, model, task, device, dtype, pool mode, command",
    "CLI contradictions": "contradictory or out-of-model export knobs; nothing left on disk",
    "Python API knobs": "`get_method(name, **knobs)` with bad values: StructKVError, never a "
    "TypeError from deep inside",
    "Engine files": "each file missing / truncated / extended / bit-flipped / emptied, manifest "
    "fields edited, manifests that are not JSON, graphs swapped, a foreign tokenizer",
    "Export under faults": "SIGKILL at five points (one export frozen at each, killed at the "
    "last), killed --force re-exports, a full disk (RLIMIT_FSIZE), unwritable parents",
    "Server": "pool exhausted, request larger than the pool, disconnects at every stage, "
    "malformed / oversized / nested bodies, random bodies (hypothesis), 1 000 bad requests, "
    "SIGTERM in flight",
}


def _class_of(name: str) -> str:
    return next((k for k in WHAT if name.startswith(k)), name)


def run_suite(log: Path) -> tuple[int, float, str]:
    env = {**os.environ, "STRUCTKV_RELIABILITY_LOG": str(log)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *MODULES]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines() or [""]
    failed = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    if failed:  # a test that failed outside a recorded case is shown on the page too
        log.with_suffix(".pytest.txt").write_text(proc.stdout[-20000:] + proc.stderr[-5000:])
    summary = lines[-1] + "".join(f"; {line}" for line in failed)
    return proc.returncode, time.perf_counter() - start, summary


def write_page(records: list[dict], out: Path, header: dict) -> None:
    classes: OrderedDict[str, list[dict]] = OrderedDict((k, []) for k in WHAT)
    for r in records:
        classes.setdefault(_class_of(r["class"]), []).append(r)
    lines = [
        "# Reliability",
        "",
        "What StructKV survives, tried by the reliability suite (`tests/test_reliability_*.py`, "
        "part of `make test`) and written by `python scripts/reliability_report.py` from the "
        "suite's own records — not by hand. *Handled* means exactly the specified outcome: one "
        "`error:` line naming the problem and the fix with exit 2 (CLI), a StructKVError (Python "
        "API, engine loading), a JSON 4xx (HTTP), nothing half-written, the process or server "
        "still usable.",
        "",
        f"Generated {header['date']} on {header['machine']}; `{header['command']}`; pytest: "
        f"{header['pytest']} ({header['seconds']:.0f} s).",
        "",
        "| class | what is tried | cases tried | handled as specified | not handled |",
        "|---|---|---|---|---|",
    ]
    failures = []
    for name, rows in classes.items():
        handled = sum(r["handled"] for r in rows)
        bad = [r for r in rows if not r["handled"]]
        failures += bad
        lines.append(f"| {name} | {WHAT.get(name, '')} | {len(rows)} | {handled} | {len(bad)} |")
    total = len(records)
    done = sum(r["handled"] for r in records)
    lines += ["", f"**{done} of {total} cases handled as specified.**", ""]
    if failures:
        lines += ["## Not handled", "", "| class | case | why |", "|---|---|---|"]
        for r in failures:
            why = r["detail"].replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| {r['class']} | {r['case']} | {why} |")
    else:
        lines += ["Every case tried was handled; no traceback reached a user."]
    lines += ["", "Raw records: [results/reliability/cases.json](results/reliability/cases.json)."]
    out.write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from-log", help="a saved log (JSON lines) instead of running the suite")
    p.add_argument("--out", default=str(ROOT / "docs" / "RELIABILITY.md"))
    args = p.parse_args()
    if args.from_log:
        log, rc, seconds, summary = Path(args.from_log), 0, 0.0, "(from a saved log)"
    else:
        log = Path(tempfile.mkstemp(prefix="reliability-", suffix=".jsonl")[1])
        log.write_text("")
        rc, seconds, summary = run_suite(log)
    records = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    raw = ROOT / "docs" / "results" / "reliability" / "cases.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(records, indent=1))
    header = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}",
        "command": "python scripts/reliability_report.py",
        "pytest": summary,
        "seconds": seconds,
    }
    write_page(records, Path(args.out), header)
    handled = sum(r["handled"] for r in records)
    print(f"{handled} of {len(records)} cases handled; pytest: {summary}; wrote {args.out}")
    return 0 if rc == 0 and handled == len(records) else 1


if __name__ == "__main__":
    sys.exit(main())
