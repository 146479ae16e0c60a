"""Which int8 product forms ONNX Runtime computes exactly on this CPU, and how fast; and what
torch's bf16 costs here against fp32.

A w8a8 engine's products are ``MatMulIntegerToFloat`` with uint8 activations (zero point 128)
and int8 weights. On x86 CPUs without VNNI/AMX that form saturates (runtime/stages.py,
``exact_u8s8_products``) and the runtime opens it as u8 x u8. This script measures, on one
4K x 576 x 1536 product (SmolLM2's MLP shape at a 4K prompt), each form's relative error
against the float definition and its median time next to torch's fp32 and bf16 products
(bf16 is 2.3x faster than fp32 with AVX512-BF16/AMX, and converted element by element
without them: ``structkv.models.fast_cpu_bf16``).

    python scripts/bench_cpu_formats.py [--rows 4096] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from structkv.models import fast_cpu_bf16
from structkv.runtime.stages import exact_u8s8_products

FORMS = {
    "u8s8": (TensorProto.UINT8, TensorProto.INT8),
    "u8u8": (TensorProto.UINT8, TensorProto.UINT8),
    "s8s8": (TensorProto.INT8, TensorProto.INT8),
}


def _median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def _session(a_type: int, b_type: int, b: np.ndarray, sb: np.ndarray, m: int, k: int):
    n = b.shape[1]
    za = 128 if a_type == TensorProto.UINT8 else 0
    zb = 128 if b_type == TensorProto.UINT8 else 0
    stored = (b + zb).astype(np.uint8 if zb else np.int8)
    inits = [
        helper.make_tensor("b", b_type, b.shape, stored.tobytes(), raw=True),
        helper.make_tensor("sb", TensorProto.FLOAT, [n], sb),
        helper.make_tensor("za", a_type, [], [za]),
        helper.make_tensor("zb", b_type, [], [zb]),
    ]  # fmt: skip
    node = helper.make_node("MatMulIntegerToFloat", ["a", "b", "sa", "sb", "za", "zb"], ["y"],
                            domain="com.microsoft")  # fmt: skip
    graph = helper.make_graph(
        [node], "product",
        [helper.make_tensor_value_info("a", a_type, [m, k]),
         helper.make_tensor_value_info("sa", TensorProto.FLOAT, [m, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--k", type=int, default=576)
    p.add_argument("--n", type=int, default=1536)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.k)).astype(np.float32)
    w = rng.standard_normal((args.n, args.k)).astype(np.float32)
    sw = (np.abs(w).max(1) / 127).astype(np.float32)
    wq = np.round(w / sw[:, None]).clip(-127, 127)
    sx = (np.abs(x).max(1, keepdims=True) / 127).astype(np.float32)
    xq = np.round(x / sx)
    want = (xq * sx) @ (wq * sw[:, None]).T
    report = {
        "cpu": _cpu_name(),
        "ort": ort.__version__,
        "exact_u8s8_products": exact_u8s8_products(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python scripts/bench_cpu_formats.py",
        "rows": args.rows,
        "forms": {},
    }
    for name, (a_type, b_type) in FORMS.items():
        session = _session(a_type, b_type, wq.T.copy(), sw, args.rows, args.k)
        a = (xq + (128 if a_type == TensorProto.UINT8 else 0)).astype(
            np.uint8 if a_type == TensorProto.UINT8 else np.int8
        )
        feed = {"a": a, "sa": sx}
        (y,) = session.run(["y"], feed)
        error = float(np.abs(y - want).max() / np.abs(want).max())
        ms = _median_ms(lambda s=session, f=feed: s.run(["y"], f), args.repeat)
        report["forms"][name] = {"relative_error": error, "median_ms": round(ms, 2)}
    xt, wt = torch.from_numpy(x), torch.from_numpy(w.T.copy())
    report["fp32_torch_ms"] = round(_median_ms(lambda: xt @ wt, args.repeat), 2)
    xb, wb = xt.bfloat16(), wt.bfloat16()
    report["bf16_torch_ms"] = round(_median_ms(lambda: xb @ wb, max(3, args.repeat // 5)), 2)
    report["fast_cpu_bf16"] = fast_cpu_bf16()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
