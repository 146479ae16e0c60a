"""Which graphs of a ``--dtype bf16`` engine ONNX Runtime's CPU provider can load (issue 17).

Exports a tiny random model in bf16 (weights streamed like any export) and opens each graph in
an ``InferenceSession`` on the CPU provider; prints, per graph, OK or the error ONNX Runtime
gives (the first operator it has no bf16 kernel for), then which bf16 operator types every
failing graph contains, each tried alone in a one-node graph.

    python scripts/ort_bf16_probe.py [--out docs/results/bf16/ort-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _single_op_loads(node, graph_proto, opsets) -> str:
    """Whether a graph of just this node (inputs as graph inputs) loads on the CPU provider."""
    import onnx
    import onnxruntime as ort

    types = {v.name: v for v in [*graph_proto.input, *graph_proto.output, *graph_proto.value_info]}
    inits = {i.name: i for i in graph_proto.initializer}
    inputs, outputs = [], []
    for name in node.input:
        if not name:
            continue
        if name in types:
            inputs.append(types[name])
        elif name in inits:
            t = inits[name]
            inputs.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
        else:
            return "unknown input type"
    for name in node.output:
        if name in types:
            outputs.append(types[name])
        else:
            outputs.append(onnx.helper.make_empty_tensor_value_info(name))
    graph = onnx.helper.make_graph([node], "one", inputs, outputs)
    model = onnx.helper.make_model(graph, opset_imports=opsets)
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return "OK"
    except Exception as e:  # ONNX Runtime raises its own exception types
        return str(e).split(":")[-1].strip()[:160]


def main() -> None:
    import onnx
    import onnxruntime as ort

    from structkv.export.exporter import ExportSettings, export_engine
    from structkv.methods import StructKV

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the JSON result here")
    args = p.parse_args()
    engine = Path(tempfile.mkdtemp()) / "bf16"
    settings = ExportSettings(StructKV(pivot=2, lam=0.5), dtype="bf16", attention="contrib")
    export_engine("tiny-llama", engine, settings, log=lambda m: None, progress=False)
    result = {"onnxruntime": ort.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC",
              time.gmtime()), "graphs": {}, "ops": {}}  # fmt: skip
    for path in sorted(engine.glob("*.onnx")):
        try:
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            result["graphs"][path.name] = "OK"
        except Exception as e:
            result["graphs"][path.name] = str(e).split(" : ")[-1][:200]
            model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
            bf16 = {v.name for v in model.graph.value_info
                    if v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16}  # fmt: skip
            bf16 |= {i.name for i in model.graph.initializer
                     if i.data_type == onnx.TensorProto.BFLOAT16}  # fmt: skip
            bf16 |= {v.name for v in model.graph.input
                     if v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16}  # fmt: skip
            for node in model.graph.node:
                key = f"{node.domain or 'ai.onnx'}::{node.op_type}"
                if key in result["ops"] or not any(n in bf16 for n in node.input):
                    continue
                result["ops"][key] = _single_op_loads(node, model.graph, model.opset_import)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
