#!/usr/bin/env python
"""TensorRT-RTX smoke test of an engine's plugin-free graphs, on a machine without a GPU.

    python scripts/trt_rtx_smoke.py --engine engine/ [--graphs pre_pivot post_pivot decode]
        [--arch 80] [--out report.json]

For each graph: TensorRT-RTX's ONNX parser, then an engine build ahead of time for the given
compute capability (TensorRT-RTX builds for SM80 without a GPU; it has no plugin support, so the
compact / kv_select / refine graphs are not tried). Dynamic dimensions get one optimisation profile
(min 32, opt 128, max 512). Prints one line per graph (parsed / built / refused, with
TensorRT's first error) and writes the same as JSON. Exit status 0 whatever TensorRT refuses:
the report is the result; 2 when tensorrt_rtx is missing or the engine is not one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PLUGIN_FREE = ("pre_pivot", "post_pivot", "post_refine", "decode")  # post_refine: two-stage


class _Collect:
    """A TensorRT logger that keeps errors (and prints nothing)."""

    def __init__(self, trt) -> None:
        base = trt.ILogger

        class Logger(base):
            def __init__(self) -> None:
                base.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg) -> None:
                if severity <= trt.ILogger.Severity.ERROR:
                    self.errors.append(msg)

        self.logger = Logger()


def smoke(engine: Path, graph: str, arch: int) -> dict:
    import tensorrt_rtx as trt

    collect = _Collect(trt).logger
    start = time.perf_counter()
    builder = trt.Builder(collect)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, collect)
    result: dict = {"graph": graph, "arch": f"sm_{arch}"}
    if not parser.parse_from_file(str(engine / f"{graph}.onnx")):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        return {**result, "parsed": False, "built": False, "error": (errors or collect.errors)[0]}
    result["parsed"] = True
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{arch}"), 0)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if -1 in shape:
            profile.set_shape(
                tensor.name,
                [32 if d == -1 else d for d in shape],
                [128 if d == -1 else d for d in shape],
                [512 if d == -1 else d for d in shape],
            )
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    result["seconds"] = round(time.perf_counter() - start, 1)
    if blob is None:
        message = collect.errors[-1] if collect.errors else "build returned nothing"
        return {**result, "built": False, "error": message[:600]}
    return {**result, "built": True, "engine_mib": round(blob.nbytes / 2**20, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True, help="engine directory (structkv-export)")
    parser.add_argument("--graphs", nargs="+", choices=PLUGIN_FREE,
                        help="default: every plugin-free graph the engine has")  # fmt: skip
    parser.add_argument("--arch", type=int, default=80, help="compute capability (default 80)")
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args()
    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError:
        print("error: tensorrt_rtx is not installed (pip install tensorrt-rtx)", file=sys.stderr)
        return 2
    engine = Path(args.engine)
    if not (engine / "manifest.json").is_file():
        print(f"error: {engine} is not a StructKV engine (no manifest.json)", file=sys.stderr)
        return 2
    manifest = json.loads((engine / "manifest.json").read_text())
    graphs = args.graphs or [g for g in PLUGIN_FREE if g in manifest.get("graphs", {})]
    report = {
        "engine": str(engine.resolve()),
        "dtype": manifest.get("dtype"),
        "attention": manifest.get("attention"),
        "tensorrt_rtx": __import__("tensorrt_rtx").__version__,
        "graphs": [smoke(engine, g, args.arch) for g in graphs],
    }
    for r in report["graphs"]:
        state = "built" if r["built"] else "parse refused"
        if r["parsed"] and not r["built"]:
            state = "parsed, build refused"
        error = f" — {r['error']}" if "error" in r else ""
        print(f"{r['graph']:>10} {r['arch']}: {state}{error}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
