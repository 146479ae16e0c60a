"""TensorRT-ready graphs (``structkv-export --target tensorrt``): the compaction and KV-selection
graphs become one ``StructKVCompact`` plugin node each (plugins_trt/).

Why whole graphs: in an engine, ``compact.onnx`` and ``kv_select.onnx`` *are* the selection (a
top-k of pooled scores, the window, a gather); TensorRT's TopK stops at K = 3840 and StructKV
keeps ceil(0.2 N) + w tokens. The replacement keeps each graph's inputs and outputs (names,
types, symbolic dims), so the engine format and runtime do not change.

The node follows what TensorRT's ONNX parser expects of a plugin node: ``op_type`` is the
plugin's name, attributes ``plugin_namespace`` / ``plugin_version`` pick the creator and every
other attribute becomes a plugin field. The ratio is written as the exact fraction the Python
budget uses (``ratio_num`` / ``ratio_den``), so the plugin's K equals the torch path's.
``chunk`` > 1 keeps whole chunks (span-preserving selection), as the traced graphs did.
ONNX Runtime runs these graphs with the reference op in
:mod:`structkv.kernels.plugin_reference` (the torch path's selection), which is how the
rewritten engine is proved to generate the same tokens.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

from structkv.kernels.plugin_reference import (
    PLUGIN,
    PLUGIN_DOMAIN,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
)

#: graph -> (plugin mode, the method's ratio attribute)
PLUGIN_GRAPHS = {"compact": ("compact", "r_struct"), "kv_select": ("kv_select", "r_kv")}


def plugin_attributes(method, mode: str) -> dict:
    """The plugin node's attributes for one mode of ``method`` (a StructKV)."""
    ratio = Fraction(getattr(method, PLUGIN_GRAPHS[mode][1])).limit_denominator(1_000_000)
    return {
        "plugin_namespace": PLUGIN_NAMESPACE,
        "plugin_version": PLUGIN_VERSION,
        "mode": mode,
        "ratio_num": ratio.numerator,
        "ratio_den": ratio.denominator,
        "window": method.window,
        "pooling": method.pooling,
        "pool_mode": method.pool_mode,
        "chunk": method.chunk if method.chunk > 1 else 0,
    }


def replace_with_plugin(path: Path, method, mode: str) -> None:
    """Rewrite the traced graph at ``path`` into one plugin node with the same interface."""
    import onnx
    from onnx import helper

    traced = onnx.load(str(path), load_external_data=False)
    graph = traced.graph
    node = helper.make_node(
        PLUGIN,
        [i.name for i in graph.input],
        [o.name for o in graph.output],
        name=f"{PLUGIN}_{mode}",
        domain=PLUGIN_DOMAIN,
        **plugin_attributes(method, mode),
    )
    new_graph = helper.make_graph([node], f"{mode}_trt", list(graph.input), list(graph.output))
    opsets = [o for o in traced.opset_import if o.domain in ("", "ai.onnx")]
    model = helper.make_model(
        new_graph,
        opset_imports=[*opsets, helper.make_opsetid(PLUGIN_DOMAIN, 1)],
        producer_name="structkv-export --target tensorrt",
    )
    model.ir_version = traced.ir_version
    onnx.save(model, str(path))


def rewrite_engine_graphs(directory: Path, method) -> None:
    """Both selection graphs of an engine being written in ``directory``."""
    for mode in PLUGIN_GRAPHS:
        replace_with_plugin(Path(directory) / f"{mode}.onnx", method, mode)
