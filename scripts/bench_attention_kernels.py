#!/usr/bin/env python
"""One causal attention at 4K tokens (SmolLM2 shapes: 9 query heads, 3 KV heads, head dim 64):
ONNX Runtime's opset-23 Attention, com.microsoft GroupQueryAttention and MultiHeadAttention vs
torch SDPA, in one run (best of 3 after a warm-up). Why: the engine's prefill is bound by it.
Also StructKV's own structkv::CausalAttention operator (the engine's default on CPU), and GQA
in 16 query blocks (block c attends to blocks 0..c, the earlier ones as GQA's past): the
experiment docs/BENCHMARKS.md reports as not adopted.

Example: python scripts/bench_attention_kernels.py
"""

import time

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto as T
from onnx import helper

N, H, G, D = 4096, 9, 3, 64


def sess(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def one_op(op: str, inputs: dict, outputs: list[str], domain: str = "", **attrs):
    """A model of one node; ``inputs`` maps name -> (element type, shape); blank names ("",
    " ", ...: distinct dict keys) leave an optional input slot empty."""
    names = [k if k.strip() else "" for k in inputs]
    node = helper.make_node(op, names, outputs, domain=domain, **attrs)
    graph = helper.make_graph(
        [node],
        op,
        [helper.make_tensor_value_info(k, *v) for k, v in inputs.items() if k.strip()],
        [helper.make_tensor_value_info(o, T.FLOAT, None) for o in outputs],
    )
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


F = T.FLOAT
# contrib GQA
m1 = one_op(
    "GroupQueryAttention",
    {"q": (F, [1, N, H * D]), "k": (F, [1, N, G * D]), "v": (F, [1, N, G * D]),
     "": None, " ": None, "seqlens_k": (T.INT32, [1]), "total_len": (T.INT32, [1])},
    ["o", "pk", "pv"],
    domain="com.microsoft",
    num_heads=H,
    kv_num_heads=G,
)  # fmt: skip
# opset-23 Attention, 4D BNSH, causal
m2 = one_op(
    "Attention",
    {"q4": (F, [1, H, N, D]), "k4": (F, [1, G, N, D]), "v4": (F, [1, G, N, D])},
    ["o4"],
    is_causal=1,
)
rng = np.random.default_rng(0)
q = rng.standard_normal((1, N, H * D), dtype=np.float32)
k = rng.standard_normal((1, N, G * D), dtype=np.float32)
v = rng.standard_normal((1, N, G * D), dtype=np.float32)
s1, s2 = sess(m1), sess(m2)
q4 = q.reshape(1, N, H, D).transpose(0, 2, 1, 3).copy()
k4 = k.reshape(1, N, G, D).transpose(0, 2, 1, 3).copy()
v4 = v.reshape(1, N, G, D).transpose(0, 2, 1, 3).copy()
feeds1 = {
    "q": q,
    "k": k,
    "v": v,
    "seqlens_k": np.array([N - 1], np.int32),
    "total_len": np.array([N], np.int32),
}


def t(f, r=3):
    f()
    ts = []
    for _ in range(r):
        a = time.perf_counter()
        f()
        ts.append(time.perf_counter() - a)
    return min(ts)


o1 = s1.run(None, feeds1)[0]
o2 = s2.run(None, {"q4": q4, "k4": k4, "v4": v4})[0]
tq, tk, tv = map(torch.from_numpy, (q4, k4, v4))
o3 = torch.nn.functional.scaled_dot_product_attention(
    tq, tk.repeat_interleave(3, 1), tv.repeat_interleave(3, 1), is_causal=True
)
print(
    "diff gqa-sdpa",
    np.abs(o1.reshape(1, N, H, D).transpose(0, 2, 1, 3) - o3.numpy()).max(),
    "att-sdpa",
    np.abs(o2 - o3.numpy()).max(),
)
print("GQA contrib", t(lambda: s1.run(None, feeds1)))
print("opset23 Attention", t(lambda: s2.run(None, {"q4": q4, "k4": k4, "v4": v4})))
print(
    "torch sdpa",
    t(
        lambda: torch.nn.functional.scaled_dot_product_attention(
            tq, tk.repeat_interleave(3, 1), tv.repeat_interleave(3, 1), is_causal=True
        )
    ),
)
m3 = one_op(
    "MultiHeadAttention",
    {"q": (F, [1, N, H * D]), "kk": (F, [1, N, H * D]), "vv": (F, [1, N, H * D])},
    ["o"],
    domain="com.microsoft",
    num_heads=H,
    unidirectional=1,
)
s3 = sess(m3)
kk = np.repeat(k.reshape(1, N, G, D), 3, axis=2).reshape(1, N, H * D)
vv = np.repeat(v.reshape(1, N, G, D), 3, axis=2).reshape(1, N, H * D)
o5 = s3.run(None, {"q": q, "kk": kk, "vv": vv})[0]
print("diff mha-sdpa", np.abs(o5.reshape(1, N, H, D).transpose(0, 2, 1, 3) - o3.numpy()).max())
print("MHA contrib", t(lambda: s3.run(None, {"q": q, "kk": kk, "vv": vv})))


def blocked_gqa(blocks: int):
    """GQA over ``blocks`` query blocks of a prompt zero-padded to a multiple of ``blocks``."""
    i64 = lambda name, vals: helper.make_tensor(name, T.INT64, [len(vals)], vals)  # noqa: E731
    inits = [i64("c0", [0]), i64("c1", [1]), i64("ax2", [2]), i64("nb", [blocks])]
    inits += [i64("nb1", [blocks - 1]), i64("bnsh", [1, -1, G, D]), i64("z3", [0, 0, 0])]
    inits += [i64(f"i{c}", [c]) for c in range(blocks + 1)]
    nodes = [
        helper.make_node("Shape", ["q"], ["shape"]),
        helper.make_node("Gather", ["shape", "c1"], ["n"], axis=0),
        helper.make_node("Add", ["n", "nb1"], ["n_up"]),
        helper.make_node("Div", ["n_up", "nb"], ["size"]),  # S = ceil(n / blocks)
        helper.make_node("Mul", ["size", "nb"], ["padded"]),
        helper.make_node("Sub", ["padded", "n"], ["pad"]),
        helper.make_node("Concat", ["z3", "c0", "pad", "c0"], ["pads"], axis=0),
    ]
    for x in "qkv":
        nodes.append(helper.make_node("Pad", [x, "pads"], [f"{x}_p"]))
    for x in "kv":  # the past: padded K/V as [1, G, n, D]
        nodes.append(helper.make_node("Reshape", [f"{x}_p", "bnsh"], [f"{x}_4d"]))
        nodes.append(helper.make_node("Transpose", [f"{x}_4d"], [f"{x}_past"], perm=[0, 2, 1, 3]))
    outs = []
    for c in range(blocks):
        b, e = f"begin{c}", f"end{c}"
        nodes += [
            helper.make_node("Mul", ["size", f"i{c}"], [b]),
            helper.make_node("Mul", ["size", f"i{c + 1}"], [e]),
            helper.make_node("Sub", [e, "c1"], [f"last{c}"]),
            helper.make_node("Cast", [f"last{c}"], [f"seqlens{c}"], to=T.INT32),
            helper.make_node("Cast", [e], [f"total{c}"], to=T.INT32),
        ]
        for x in "qkv":
            nodes.append(helper.make_node("Slice", [f"{x}_p", b, e, "c1"], [f"{x}{c}"]))
        past = ["", ""]
        if c:
            for x in "kv":
                nodes.append(helper.make_node("Slice", [f"{x}_past", "c0", b, "ax2"], [f"{x}h{c}"]))
            past = [f"kh{c}", f"vh{c}"]
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [f"q{c}", f"k{c}", f"v{c}", *past, f"seqlens{c}", f"total{c}"],
                [f"o{c}", f"pk{c}", f"pv{c}"],
                domain="com.microsoft",
                num_heads=H,
                kv_num_heads=G,
            )
        )
        outs.append(f"o{c}")
    nodes += [
        helper.make_node("Concat", outs, ["o_p"], axis=1),
        helper.make_node("Slice", ["o_p", "c0", "n", "c1"], ["o"]),
    ]
    inputs = [helper.make_tensor_value_info(x, F, [1, "n", w]) for x, w in
              (("q", H * D), ("k", G * D), ("v", G * D))]  # fmt: skip
    graph = helper.make_graph(
        nodes, "blocked", inputs, [helper.make_tensor_value_info("o", F, None)], inits
    )
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


s4 = sess(blocked_gqa(16))
o6 = s4.run(None, {"q": q, "k": k, "v": v})[0]
print("diff gqa16-sdpa", np.abs(o6.reshape(1, N, H, D).transpose(0, 2, 1, 3) - o3.numpy()).max())
print("GQA contrib, 16 query blocks", t(lambda: s4.run(None, {"q": q, "k": k, "v": v})))

# StructKV's own operator (structkv/kernels/csrc; `structkv-export --attention structkv` emits it):
# [B, heads, N, D] in and out, the 3 KV heads read directly. Spinning off, as the engine runs it.
from structkv.kernels import ort_ops  # noqa: E402

m5 = one_op("CausalAttention", {"q4": (F, [1, H, N, D]), "k4": (F, [1, G, N, D]),
            "v4": (F, [1, G, N, D])}, ["o4"], domain=ort_ops.DOMAIN)  # fmt: skip
m5.opset_import.append(helper.make_opsetid(ort_ops.DOMAIN, 1))
opts = ort.SessionOptions()
ort_ops.register(opts)
opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
s5 = ort.InferenceSession(m5.SerializeToString(), opts, providers=["CPUExecutionProvider"])
o7 = s5.run(None, {"q4": q4, "k4": k4, "v4": v4})[0]
print("diff structkv-sdpa", np.abs(o7 - o3.numpy()).max())
print("structkv CausalAttention", t(lambda: s5.run(None, {"q4": q4, "k4": k4, "v4": v4})))
