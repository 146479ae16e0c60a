"""``structkv-export --quant int8|int4``: weight matrices as ONNX Runtime block-quantised ops.

Why in the graph before the weights exist: the exporter never holds the weights
(export/checkpoint.py); a traced graph multiplies by *pending* initializers named after their
checkpoint tensors. This pass rewrites those products — ``MatMul(x, W::T)`` (every projection
and the MLP) and ``Gemm(x, W, transB=1)`` (the LM head) — into ``com.microsoft::MatMulNBits``
and the embedding's ``Gather(W, ids)`` into ``GatherBlockQuantized``, pointing at new pending
initializers ``W::q4g32`` (packed), ``W::q4g32.scales`` and ``W::q4g32.rows`` (the same bytes
seen as a table of rows). The streaming step then quantises each checkpoint tensor once, block
of rows by block of rows (:func:`stream_quantized`), so a tied embedding / LM head is stored
once and a 32B model quantises in the memory of one block.

Policy: every 2-D weight is quantised — projections, MLP, LM head *and* the input embedding (it
is 21 % of SmolLM2-135M's parameters; left in fp32 the int4 engine could not be below 0.3× the
fp32 one). 1-D weights (norms, biases) and the rotary tables stay in the engine's dtype.

``--quant w8a8`` rewrites the same products into an integer GEMM with per-token activations:
the product's input is quantised once (shared by q/k/v and by gate/up: :class:`_TokenQuant`)
with standard operators, ``MatMulIntegerToFloat(x_q, Transpose(W::q8g0), s_x, s_w, 128)`` does
the product and both scales in one kernel (ONNX Runtime folds the constant ``Transpose`` into
a ``[K, N]`` initializer when the session loads), and the embedding gathers int8 rows and their
scales. Weights are stored once, in the checkpoint's ``[N, K]`` row layout.
"""

from __future__ import annotations

from structkv.errors import StructKVError
from structkv.export.checkpoint import TRANSPOSED, VIEW, _is_pending, _pending
from structkv.quant import QuantSpec

MS_DOMAIN = "com.microsoft"
SCALES = ".scales"
#: The packed bytes viewed as ``[N, K · bits / 8]`` rows (GatherBlockQuantized's ``data``).
ROWS = VIEW


def quantize_graph(model, spec: QuantSpec) -> int:
    """Rewrite an ``onnx_ir`` model's weight products and embedding gathers (see the module
    docstring); returns how many nodes were rewritten."""
    import onnx_ir as ir

    graph = model.graph
    done = 0
    tokens = _TokenQuant(graph) if spec.per_token else None
    for node in list(graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "MatMul":
            w = node.inputs[1]
            if not _pending_matrix(w) or not w.name.endswith(TRANSPOSED):
                continue
            k, n = (int(d) for d in w.shape)
            base = w.name[: -len(TRANSPOSED)]
            bias = None
        elif node.op_type == "Gemm":
            w = node.inputs[1]
            attrs = {a: node.attributes.get(a) for a in ("transA", "transB", "alpha", "beta")}
            plain = (
                _pending_matrix(w)
                and attrs["transB"] is not None and attrs["transB"].as_int() == 1
                and (attrs["transA"] is None or attrs["transA"].as_int() == 0)
                and (attrs["alpha"] is None or attrs["alpha"].as_float() == 1.0)
                and (attrs["beta"] is None or attrs["beta"].as_float() == 1.0)
            )  # fmt: skip
            if not plain:
                continue
            n, k = (int(d) for d in w.shape)
            base = w.name
            bias = node.inputs[2] if len(node.inputs) > 2 else None
        elif node.op_type == "Gather":
            w = node.inputs[0]
            axis = node.attributes.get("axis")
            if not _pending_matrix(w) or (axis is not None and axis.as_int() != 0):
                continue
            rows, k = (int(d) for d in w.shape)
            spec.check_width(k, f"embedding {w.name}")
            if spec.per_token:
                data, scales = _quantized(graph, w.name, rows, k, spec, w.dtype)
                _replace_many(graph, node, _gather_rows(node, data, scales))
                done += 1
                continue
            data, scales = _quantized(graph, w.name, rows, k, spec, w.dtype, rows_view=True)
            new = ir.node(
                "GatherBlockQuantized",
                [data, node.inputs[1], scales],
                {"gather_axis": 0, "quantize_axis": 1, "block_size": spec.group, "bits": spec.bits},
                domain=MS_DOMAIN,
                name=f"{node.name}_q",
            )
            _replace(graph, node, new)
            done += 1
            continue
        else:
            continue
        spec.check_width(k, base)
        packed, scales = _quantized(graph, base, n, k, spec, w.dtype)
        if tokens is not None:
            _replace_many(graph, node, tokens.product(node, packed, scales, n, k, bias))
            done += 1
            continue
        inputs = [node.inputs[0], packed, scales]
        if bias is not None:
            inputs += [None, None, bias]  # zero_points, g_idx absent
        new = ir.node(
            "MatMulNBits",
            inputs,
            {
                "K": k,
                "N": n,
                "bits": spec.bits,
                "block_size": spec.group,
                "accuracy_level": spec.accuracy_level,
            },
            domain=MS_DOMAIN,
            name=f"{node.name}_q",
        )
        _replace(graph, node, new)
        done += 1
    if done:
        model.opset_imports[MS_DOMAIN] = 1
        for v in list(graph.initializers.values()):
            if not v.uses() and _is_pending(v.const_value):
                graph.initializers.pop(v.name)
    return done


class _TokenQuant:
    """w8a8's activation side: each product input ``x [..., K]`` quantised once per graph to
    ``x_q`` (uint8, zero point 128) and ``s_x`` (``[M, 1]``, ``max|x| / 127`` per token) on
    ``M = prod(leading dims)`` rows, and the products' 2-D results reshaped back."""

    def __init__(self, graph) -> None:
        self.graph = graph
        self.done: dict[int, tuple] = {}

    def _quantised(self, x, k: int, at) -> tuple:
        import numpy as np
        import onnx_ir as ir

        if id(x) in self.done:  # the entry holds x, so its id cannot be reused meanwhile
            return self.done[id(x)][1:]

        def const(value, dtype):
            return add(ir.node("Constant", [], {"value": ir.tensor(np.asarray(value, dtype))}))

        new: list = []

        def add(n):
            new.append(n)
            return n.outputs[0]

        lead = add(ir.node("Slice", [add(ir.node("Shape", [x])), const([0], np.int64),
                                     const([-1], np.int64)]))  # fmt: skip
        x2 = add(ir.node("Reshape", [x, const([-1, k], np.int64)]))
        top = add(ir.node("ReduceMax", [add(ir.node("Abs", [x2])), const([1], np.int64)],
                          {"keepdims": 1}))  # fmt: skip
        # a row of zeros gets a tiny scale, not 0 (0/0 would be NaN): it quantises to zeros
        s = add(ir.node("Max", [add(ir.node("Mul", [top, const(1 / 127, np.float32)])),
                                const(1e-30, np.float32)]))  # fmt: skip
        r = add(ir.node("Round", [add(ir.node("Div", [x2, s]))]))
        q = add(ir.node("Cast", [add(ir.node("Add", [r, const(128.0, np.float32)]))],
                        {"to": ir.DataType.UINT8}))  # fmt: skip
        zero = const(128, np.uint8)
        self.graph.insert_before(at, new)
        self.done[id(x)] = (x, q, s, zero, lead)
        return self.done[id(x)][1:]

    def product(self, node, packed, scales, n: int, k: int, bias) -> list:
        """Nodes computing ``node``'s product ``x @ W^T (+ bias)`` from the int8 weight."""
        import numpy as np
        import onnx_ir as ir

        q, s, zero, lead = self._quantised(node.inputs[0], k, node)
        wt = ir.node("Transpose", [packed], {"perm": [1, 0]})
        inputs = [q, wt.outputs[0], s, scales, zero]
        mm = ir.node("MatMulIntegerToFloat", inputs, domain=MS_DOMAIN, name=f"{node.name}_q")
        new = [wt, mm]
        if bias is not None:
            # not the operator's own bias input: ONNX Runtime 1.32 scales that by a per-row
            # a_scale too (tests/test_quant.py caught it)
            new.append(ir.node("Add", [mm.outputs[0], bias]))
        width = ir.node("Constant", [], {"value": ir.tensor(np.asarray([n], np.int64))})
        shape = ir.node("Concat", [lead, width.outputs[0]], {"axis": 0})
        out = ir.node("Reshape", [new[-1].outputs[0], shape.outputs[0]])
        return [*new, width, shape, out]


def _gather_rows(node, data, scales) -> list:
    """w8a8 embedding: int8 rows and their scales gathered, ``rows · scale`` in fp32."""
    import numpy as np
    import onnx_ir as ir

    ids = node.inputs[1]
    rows = ir.node("Gather", [data, ids], {"axis": 0})
    cast = ir.node("Cast", [rows.outputs[0]], {"to": ir.DataType.FLOAT})
    scale = ir.node("Gather", [scales, ids], {"axis": 0})
    axis = ir.node("Constant", [], {"value": ir.tensor(np.asarray([-1], np.int64))})
    column = ir.node("Unsqueeze", [scale.outputs[0], axis.outputs[0]])
    out = ir.node("Mul", [cast.outputs[0], column.outputs[0]], name=f"{node.name}_q")
    return [rows, cast, scale, axis, column, out]


def _replace_many(graph, node, new: list) -> None:
    """``node`` replaced by the nodes ``new``, the last of which computes its output."""
    *before, last = new
    if before:
        graph.insert_before(node, before)
    _replace(graph, node, last)


def _pending_matrix(value) -> bool:
    return (
        value is not None
        and value.const_value is not None
        and _is_pending(value.const_value)
        and value.shape is not None
        and len(value.shape) == 2
    )


def _replace(graph, node, new) -> None:
    out = new.outputs[0]
    out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
    graph.insert_before(node, [new])
    name = node.outputs[0].name
    node.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    out.name = name  # a graph output (the logits) keeps its name


def _quantized(graph, base: str, n: int, k: int, spec: QuantSpec, dtype, rows_view=False):
    """The pending (packed, scales) initializers of checkpoint tensor ``base`` (``[n, k]``),
    created once per graph."""
    import onnx_ir as ir

    name = base + spec.suffix
    if spec.group == 0:  # w8a8: int8 [n, k] rows, one scale per row
        wanted = [
            (name, ir.Shape([n, k]), ir.DataType.INT8),
            (name + SCALES, ir.Shape([n]), dtype),
        ]
        return _initializers(graph, wanted)
    blocks = k // spec.group
    wanted = [
        (name + ROWS, ir.Shape([n, k * spec.bits // 8]), ir.DataType.UINT8) if rows_view else
        (name, ir.Shape([n, blocks, spec.group * spec.bits // 8]), ir.DataType.UINT8),
        (name + SCALES, ir.Shape([n, blocks]), dtype),
    ]  # fmt: skip
    return _initializers(graph, wanted)


def _initializers(graph, wanted) -> list:
    """The pending initializers ``(name, shape, dtype)``, created once per graph."""
    import onnx_ir as ir

    out = []
    for init_name, shape, dt in wanted:
        if init_name not in graph.initializers:
            value = ir.Value(name=init_name, shape=shape, type=ir.TensorType(dt))
            value.const_value = _pending(init_name, dt, shape)
            graph.register_initializer(value)
        out.append(graph.initializers[init_name])
    return out


def parse_name(name: str) -> tuple[str, QuantSpec, str] | None:
    """``W::q4g32[.scales|.rows]`` -> (``W``, spec, part) with part ``packed`` / ``scales`` /
    ``rows``; None for a name that is not a quantised weight."""
    base, sep, tail = name.rpartition("::q")
    if not sep:
        return None
    part = "packed"
    for suffix, label in ((SCALES, "scales"), (ROWS, "rows")):
        if tail.endswith(suffix):
            tail, part = tail[: -len(suffix)], label
    bits, g, group = tail.partition("g")
    if not (g and bits.isdigit() and group.isdigit()):
        return None
    group_size = int(group)
    return base, QuantSpec(int(bits), group_size, per_token=group_size == 0), part


def stream_if_quantized(checkpoint, name: str, scale_dtype, store, bar=None):
    """``bind_weights``' hook: quantise ``name`` if it is a quantised weight, else None."""
    if parse_name(name) is None:
        return None
    return stream_quantized(checkpoint, name, scale_dtype, store, bar)


def stream_quantized(checkpoint, name: str, scale_dtype, store, bar=None) -> dict[str, tuple]:
    """Quantise checkpoint tensor ``W`` of the pending ``name`` (``W::q4g32...``) block of rows
    by block of rows into two reserved regions of ``store``; returns the (offset, length) of
    each of its initializer names (packed, rows view, scales)."""
    import torch

    from structkv.export.checkpoint import BLOCK_BYTES, _bytes
    from structkv.quant import quantize_rows

    base, spec, _ = parse_name(name)
    if base not in checkpoint.names():
        raise StructKVError(
            f"the checkpoint has no tensor {base!r} that the model's config needs; is the "
            "directory complete (all shards of model.safetensors.index.json)?"
        )
    shape = checkpoint.shape(base)
    if len(shape) != 2:
        raise StructKVError(f"checkpoint tensor {base} has shape {list(shape)}, not a matrix")
    rows, k = shape
    spec.check_width(k, base)
    scale_size = torch.empty((), dtype=scale_dtype).element_size()
    packed_len = rows * k * spec.bits // 8
    blocks = spec.blocks(k)
    scales_len = rows * blocks * scale_size
    key = base + spec.suffix
    at_packed = store.reserve(f"checkpoint:{key}", packed_len)
    at_scales = store.reserve(f"checkpoint:{key}{SCALES}", scales_len)
    step = max(1, BLOCK_BYTES // max(1, k * 4))  # quantised in fp32
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        packed, scales = quantize_rows(checkpoint.read_rows(base, start, stop), spec, scale_dtype)
        store.write_at(at_packed + start * k * spec.bits // 8, _bytes(packed))
        store.write_at(at_scales + start * blocks * scale_size, _bytes(scales))
        if bar is not None:
            bar.update((stop - start) * (k * spec.bits // 8 + blocks * scale_size))
    return {
        key: (at_packed, packed_len),
        key + ROWS: (at_packed, packed_len),
        key + SCALES: (at_scales, scales_len),
    }
