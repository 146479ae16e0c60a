"""ONNX Runtime sessions for TensorRT-target graphs: the ``StructKVCompact`` plugin node run by a
reference implementation (the torch path's own selection and gather) through
onnxruntime-extensions' Python custom operators.

Why: a graph rewritten for TensorRT must be proved to compute what the engine computed before
the rewrite, on a machine without TensorRT. The reference is :func:`structkv.selection.
select_tokens` / :func:`gather_tokens` — the functions the kernels are tested against — so an
engine whose selection graphs are plugin nodes must generate the same tokens as the plain one.

onnxruntime-extensions registers Python ops in its own domain, one signature per op type, so the
session gets an in-memory copy of the graph whose plugin node is renamed per mode
(``StructKVCompact_compact`` / ``StructKVCompact_kv_select``) into that domain. fp32 only (the
Python op's declared types); fp16/bf16 plugin graphs are for TensorRT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from structkv.errors import StructKVError

#: The TensorRT plugin node (plugins_trt/structKVCompactPlugin) as TensorRT's ONNX parser
#: finds it: op type = plugin name, attributes plugin_namespace / plugin_version.
PLUGIN = "StructKVCompact"
PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_NAMESPACE = "structkv"
PLUGIN_VERSION = "1"
_REGISTERED: list[bool] = []


def _budget(n: int, num: int, den: int) -> int:
    return (num * n + den - 1) // den


def _keep(scores: np.ndarray, n_prompt: int, attrs: dict):
    import torch

    from structkv.selection import select_tokens

    k = _budget(n_prompt, int(attrs["ratio_num"]), int(attrs["ratio_den"]))
    return select_tokens(
        torch.from_numpy(np.ascontiguousarray(scores)),
        k,
        int(attrs["window"]),
        int(attrs["pooling"]),
        attrs["pool_mode"],
        int(attrs.get("chunk", 0) or 0),
    )


def register() -> str:
    """Define the reference ops once per process; returns the extensions library path."""
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError:
        raise StructKVError(
            "running a --target tensorrt engine in ONNX Runtime needs onnxruntime-extensions "
            "(pip install onnxruntime-extensions); TensorRT runs it with plugins_trt/"
        ) from None
    if _REGISTERED:
        return get_library_path()
    import torch

    from structkv.selection import gather_tokens

    f32, i64, text = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64, PyCustomOpDef.dt_string
    attrs = {"mode": text, "ratio_num": i64, "ratio_den": i64, "window": i64, "pooling": i64,
             "pool_mode": text, "chunk": i64, "plugin_namespace": text,
             "plugin_version": text}  # fmt: skip

    @onnx_op(op_type="StructKVCompact_compact", inputs=[f32, f32], outputs=[f32, i64], attrs=attrs)
    def compact(hidden, centrality, **kw):
        keep = _keep(centrality, centrality.shape[0], kw)
        kept = torch.from_numpy(np.ascontiguousarray(hidden))[:, keep]
        return kept.numpy(), keep.numpy().astype(np.int64)

    @onnx_op(
        op_type="StructKVCompact_kv_select",
        inputs=[f32, f32, f32, i64, i64],
        outputs=[f32, f32, i64],
        attrs=attrs,
    )
    def kv_select(keys, values, saliency, positions, prompt_len, **kw):
        keep = _keep(saliency, prompt_len.shape[0], kw)  # [l, G, K]
        k = gather_tokens(torch.from_numpy(np.ascontiguousarray(keys)), keep)
        v = gather_tokens(torch.from_numpy(np.ascontiguousarray(values)), keep)
        return k.numpy(), v.numpy(), positions[keep.numpy()].astype(np.int64)

    _REGISTERED.append(True)
    return get_library_path()


def session(path: Path, options, providers: list):
    """An InferenceSession for a plugin-node graph at ``path`` (fp32), run by the reference."""
    import onnx
    import onnxruntime as ort

    library = register()
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == PLUGIN and node.domain == PLUGIN_DOMAIN:
            mode = next(a.s.decode() for a in node.attribute if a.name == "mode")
            node.op_type, node.domain = f"{PLUGIN}_{mode}", "ai.onnx.contrib"
    for opset in model.opset_import:
        if opset.domain == PLUGIN_DOMAIN:
            opset.domain = "ai.onnx.contrib"
    if any(i.type.tensor_type.elem_type != onnx.TensorProto.FLOAT for i in model.graph.input[:1]):
        raise StructKVError(
            f"{path.name}: the ONNX Runtime reference of StructKVCompact runs fp32 graphs only; "
            "fp16/bf16 TensorRT-target engines run in TensorRT (plugins_trt/)"
        )
    options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)


def is_plugin_graph(path: Path) -> bool:
    """Whether the ONNX file at ``path`` holds a StructKVCompact plugin node."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type == PLUGIN and n.domain == PLUGIN_DOMAIN for n in model.graph.node)
