"""Rewrite the exported graphs' causal attention into a fused causal-attention kernel:
ONNX Runtime's ``com.microsoft.GroupQueryAttention`` ("contrib") or StructKV's own
``structkv::CausalAttention`` ("structkv", ``structkv/kernels/csrc``; faster on CPU because it
skips the masked half of the scores).

Why: torch.onnx maps SDPA to the opset-23 ``Attention`` operator, which ONNX Runtime's CPU
provider runs 2-3x slower than ``com.microsoft.GroupQueryAttention`` on the same causal
problem (``scripts/bench_attention_kernels.py``: 0.50 s vs 0.27 s at 4K for SmolLM2's shapes),
and prefill is bound by it. GQA also reads the 3 KV heads directly, so the ``repeat_kv``
expansion that feeds ``Attention`` disappears.

Only the plain case is rewritten: ``Attention(q, k, v)`` with ``is_causal=1``, no mask, no
softcap, 4-D ``[B, heads, n, D]`` inputs of one sequence length and static head counts. Masked
attention (sliding-window layers, the decode step) keeps the standard operator. Causal order is
index order, which is position order in every graph because compacted sequences stay sorted.
The rewritten graphs need ONNX Runtime (neither op is part of the ONNX standard; the structkv
one also needs the library from ``structkv.kernels.ort_ops``), which is why ``structkv-export
--attention onnx`` keeps the standard operator for other runtimes.
"""

from __future__ import annotations

import numpy as np

MS_DOMAIN = "com.microsoft"
KERNELS = ("contrib", "structkv", "structkv-bf16")


def _const(ints: list[int]):
    import onnx_ir as ir

    return ir.node("Constant", [], {"value": ir.tensor(np.asarray(ints, dtype=np.int64))})


def _unexpanded(value):
    """``k`` before ``repeat_kv`` (Unsqueeze -> Expand -> Reshape), with its head count, or
    ``None`` when the value is not that pattern."""
    reshape = value.producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    expand = reshape.inputs[0].producer()
    if expand is None or expand.op_type != "Expand":
        return None
    unsqueeze = expand.inputs[0].producer()
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return None
    source = unsqueeze.inputs[0]
    shape = source.shape
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int):
        return None
    return source, shape[1]


def _is_plain_causal(node) -> bool:
    attrs = node.attributes
    inputs = [v for v in node.inputs if v is not None]
    if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
        return False
    if len(inputs) != 3 or len(node.inputs) != 3 or len(node.outputs) != 1:
        return False
    if attrs.get("is_causal") is None or attrs["is_causal"].as_int() != 1:
        return False
    if attrs.get("softcap") is not None and attrs["softcap"].as_float() != 0.0:
        return False
    shape = node.inputs[0].shape
    return (
        shape is not None
        and len(shape) == 4
        and isinstance(shape[1], int)
        and isinstance(shape[3], int)
    )


def fuse_causal_attention(model, kernel: str = "contrib") -> int:
    """Replace every plain causal ``Attention`` node of an ``onnx_ir`` model by the fused
    ``kernel`` ("contrib": ``GroupQueryAttention``; "structkv": ``structkv::CausalAttention``;
    "structkv-bf16": the same with its products in bf16);
    returns how many were replaced."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {KERNELS}")
    graph = model.graph
    targets = [node for node in graph if _is_plain_causal(node)]
    for node in targets:
        if kernel == "contrib":
            _rewrite(graph, node)
        else:
            _rewrite_structkv(graph, node, bf16=kernel == "structkv-bf16")
    if targets:
        if kernel == "contrib":
            model.opset_imports[MS_DOMAIN] = 1
        else:
            from structkv.kernels.ort_ops import DOMAIN

            model.opset_imports[DOMAIN] = 1
        _drop_dead(graph)
    return len(targets)


def _rewrite_structkv(graph, node, bf16: bool = False) -> None:
    """``Attention(q, k, v)`` -> ``structkv::CausalAttention(q, k, v)`` on the same 4-D
    ``[B, heads, n, D]`` layout (no transposes), reading K/V before ``repeat_kv``."""
    import onnx_ir as ir

    from structkv.kernels.ort_ops import DOMAIN, OP

    q, k, v = node.inputs
    kv = [_unexpanded(k), _unexpanded(v)]
    if kv[0] is not None and kv[1] is not None and kv[0][1] == kv[1][1]:
        (k, _), (v, _) = kv
    attrs = {}
    scale = node.attributes.get("scale")
    if scale is not None:
        attrs["scale"] = scale.as_float()
    if bf16:
        attrs["bf16"] = 1
    fused = ir.node(OP, [q, k, v], attrs, domain=DOMAIN, name=f"{node.name}_structkv")
    out = fused.outputs[0]
    out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
    graph.insert_before(node, [fused])
    node.outputs[0].replace_all_uses_with(out)
    graph.remove(node, safe=True)


def _rewrite(graph, node) -> None:
    import onnx_ir as ir

    q, k, v = node.inputs
    heads, head_dim = q.shape[1], q.shape[3]
    kv = [_unexpanded(k), _unexpanded(v)]
    if kv[0] is not None and kv[1] is not None and kv[0][1] == kv[1][1]:
        (k, kv_heads), (v, _) = kv
    else:
        kv_heads = k.shape[1] if k.shape is not None and isinstance(k.shape[1], int) else heads
    new: list[ir.Node] = []

    def add(n: ir.Node) -> ir.Value:
        new.append(n)
        return n.outputs[0]

    flat = add(_const([0, 0, -1]))
    q3, k3, v3 = (  # [B, h, n, D] -> [B, n, h*D]
        add(ir.node("Reshape", [add(ir.node("Transpose", [x], {"perm": [0, 2, 1, 3]})), flat]))
        for x in (q, k, v)
    )
    shape = add(ir.node("Shape", [q]))
    n = add(ir.node("Gather", [shape, add(_const([2]))], {"axis": 0}))
    batch = add(ir.node("Gather", [shape, add(_const([0]))], {"axis": 0}))
    n32 = add(ir.node("Cast", [n], {"to": ir.DataType.INT32}))
    one = add(ir.node("Constant", [], {"value": ir.tensor(np.asarray([1], np.int32))}))
    # GQA's per-sequence "index of the last key": n - 1 for every sequence of the batch.
    seqlens = add(ir.node("Expand", [add(ir.node("Sub", [n32, one])), batch]))
    total = add(ir.node("Squeeze", [n32]))
    attrs = {"num_heads": heads, "kv_num_heads": kv_heads}
    scale = node.attributes.get("scale")
    if scale is not None:
        attrs["scale"] = scale.as_float()
    gqa = ir.node(
        "GroupQueryAttention",
        [q3, k3, v3, None, None, seqlens, total],
        attrs,
        domain=MS_DOMAIN,
        num_outputs=3,
        name=f"{node.name}_gqa",
    )
    new.append(gqa)
    o4 = add(ir.node("Reshape", [gqa.outputs[0], add(_const([0, 0, heads, head_dim]))]))
    out = add(ir.node("Transpose", [o4], {"perm": [0, 2, 1, 3]}))
    out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
    graph.insert_before(node, new)
    node.outputs[0].replace_all_uses_with(out)
    graph.remove(node, safe=True)


def _drop_dead(graph) -> None:
    """Remove nodes whose outputs nobody reads (the orphaned ``repeat_kv`` expansions) and the
    initializers only they read."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if all(not out.uses() and not out.is_graph_output() for out in node.outputs):
                graph.remove(node, safe=True)
                changed = True
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            del graph.initializers[name]
