"""TensorRT-ready graphs (``structkv-export --target tensorrt``): the compaction and KV-selection
graphs (and a two-stage engine's ``refine``) become one ``StructKVCompact`` plugin node each
(plugins_trt/).

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

#: graph -> (plugin mode, the method's ratio attribute). A two-stage engine's ``refine`` graph
#: (the second cut, hidden ``[1, n, E]`` by the present tokens' centrality ``[n]``) is the
#: ``kv_select`` mode on one row: hidden as keys ``[1, 1, n, E]``, centrality as saliency
#: ``[1, 1, n]``, the budget a fraction of ``prompt_len`` as in KV selection.
PLUGIN_GRAPHS = {
    "compact": ("compact", "r_struct"),
    "kv_select": ("kv_select", "r_kv"),
    "refine": ("kv_select", "r_refine"),
}


def plugin_attributes(method, graph: str) -> dict:
    """The plugin node's attributes for the selection graph ``graph`` of ``method`` (a
    StructKV)."""
    mode, ratio_of = PLUGIN_GRAPHS[graph]
    ratio = Fraction(getattr(method, ratio_of)).limit_denominator(1_000_000)
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


def replace_with_plugin(path: Path, method, graph: str) -> None:
    """Rewrite the traced graph at ``path`` into one plugin node with the same interface
    (``refine``: the node between the reshapes that make its inputs one ``kv_select`` row)."""
    import onnx
    from onnx import TensorProto, helper

    traced = onnx.load(str(path), load_external_data=False)
    graph_in, graph_out = list(traced.graph.input), list(traced.graph.output)
    node_name = f"{PLUGIN}_{graph}"
    attributes = plugin_attributes(method, graph)
    initializers = []
    if graph == "refine":
        hidden, positions, centrality, prompt_len = (i.name for i in graph_in)
        kept_hidden, kept_positions = (o.name for o in graph_out)
        initializers = [
            helper.make_tensor("axis_0", TensorProto.INT64, [1], [0]),
            helper.make_tensor("axes_01", TensorProto.INT64, [2], [0, 1]),
        ]
        nodes = [
            helper.make_node("Unsqueeze", [hidden, "axis_0"], ["rows_hidden"]),  # [1, 1, n, E]
            helper.make_node("Unsqueeze", [centrality, "axes_01"], ["rows_scores"]),  # [1, 1, n]
            helper.make_node(
                PLUGIN,
                ["rows_hidden", "rows_hidden", "rows_scores", positions, prompt_len],
                ["kept_rows", "kept_rows_again", "kept_rows_positions"],
                name=node_name,
                domain=PLUGIN_DOMAIN,
                **attributes,
            ),
            helper.make_node("Squeeze", ["kept_rows", "axis_0"], [kept_hidden]),
            helper.make_node("Squeeze", ["kept_rows_positions", "axes_01"], [kept_positions]),
        ]
    else:
        nodes = [
            helper.make_node(
                PLUGIN,
                [i.name for i in graph_in],
                [o.name for o in graph_out],
                name=node_name,
                domain=PLUGIN_DOMAIN,
                **attributes,
            )
        ]
    new_graph = helper.make_graph(nodes, f"{graph}_trt", graph_in, graph_out, initializers)
    opsets = [o for o in traced.opset_import if o.domain in ("", "ai.onnx")]
    model = helper.make_model(
        new_graph,
        opset_imports=[*opsets, helper.make_opsetid(PLUGIN_DOMAIN, 1)],
        producer_name="structkv-export --target tensorrt",
    )
    model.ir_version = traced.ir_version
    onnx.save(model, str(path))


def rewrite_engine_graphs(directory: Path, method) -> list[str]:
    """Every selection graph of an engine being written in ``directory``; returns their names."""
    graphs = [g for g in PLUGIN_GRAPHS if (Path(directory) / f"{g}.onnx").is_file()]
    for graph in graphs:
        replace_with_plugin(Path(directory) / f"{graph}.onnx", method, graph)
    return graphs
