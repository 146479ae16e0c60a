"""StructKV's ONNX Runtime attention operator (structkv/kernels/csrc) against torch SDPA:
shapes that cross the kernel's 64-row blocks and 32-key tiles, every head-dimension path, GQA
ratios, a batch, the scale attribute, and the refusal of inconsistent shapes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from structkv.kernels import ort_ops


def _session(scale: float | None = None, bf16: bool = False):
    attrs = {} if scale is None else {"scale": scale}
    if bf16:
        attrs["bf16"] = 1
    node = helper.make_node(ort_ops.OP, ["q", "k", "v"], ["o"], domain=ort_ops.DOMAIN, **attrs)
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [node],
        "attention",
        [helper.make_tensor_value_info(x, f, ["b", "h" + x, "n", "d"]) for x in "qkv"],
        [helper.make_tensor_value_info("o", f, None)],
    )
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid(ort_ops.DOMAIN, 1)]
    opts = ort.SessionOptions()
    ort_ops.register(opts)
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _reference(q, k, v, scale=None, dtype=torch.float64):
    group = q.shape[1] // k.shape[1]
    q, k, v = (torch.from_numpy(x).to(dtype) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True, scale=scale
    )
    return out.double().numpy()


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "n", "dim"),
    [
        (1, 9, 3, 1, 64),  # one token
        (1, 9, 3, 63, 64),
        (1, 9, 3, 65, 64),  # one past a query block
        (2, 4, 2, 130, 64),  # batch, two full blocks + 2 rows
        (1, 4, 4, 100, 128),  # MHA, head dim 128
        (1, 6, 2, 97, 32),
        (1, 2, 1, 70, 256),
        (1, 4, 1, 77, 48),  # head dim outside the vector paths: the scalar fallback
        (1, 3, 3, 1000, 64),
    ],
)
def test_causal_attention_matches_sdpa(batch, heads, kv_heads, n, dim):
    rng = np.random.default_rng(n + dim)
    q = rng.standard_normal((batch, heads, n, dim), dtype=np.float32)
    k = rng.standard_normal((batch, kv_heads, n, dim), dtype=np.float32)
    v = rng.standard_normal((batch, kv_heads, n, dim), dtype=np.float32)
    (got,) = _session().run(None, {"q": q, "k": k, "v": v})
    np.testing.assert_allclose(got, _reference(q, k, v), atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "n", "dim"),
    [(1, 9, 3, 1, 64), (1, 9, 3, 65, 64), (2, 4, 2, 130, 64), (1, 4, 4, 100, 128),
     (1, 6, 2, 97, 32), (1, 2, 1, 70, 256), (1, 4, 1, 77, 48), (1, 3, 3, 1000, 64)],
)  # fmt: skip
def test_bf16_products_are_as_close_as_torch_bf16(batch, heads, kv_heads, n, dim):
    """``bf16=1`` (``--attention structkv-bf16``): at most 1.5x the error of torch's own bf16
    SDPA against float64 (both round Q, K, V and the probabilities to bf16), and really in bf16
    where the CPU has AVX512-BF16 (it differs from the fp32 result); head dimensions the bf16
    path does not serve (48), and CPUs without AVX512-BF16, compute in fp32."""
    rng = np.random.default_rng(n + dim + 1)
    q = rng.standard_normal((batch, heads, n, dim), dtype=np.float32)
    k = rng.standard_normal((batch, kv_heads, n, dim), dtype=np.float32)
    v = rng.standard_normal((batch, kv_heads, n, dim), dtype=np.float32)
    feed = {"q": q, "k": k, "v": v}
    (got,) = _session(bf16=True).run(None, feed)
    (fp32,) = _session().run(None, feed)
    exact = _reference(q, k, v)
    if not ort_ops.has_bf16() or dim not in (32, 64, 128, 256):
        np.testing.assert_array_equal(got, fp32)
        return
    torch_bf16 = np.abs(_reference(q, k, v, dtype=torch.bfloat16) - exact).max()
    assert np.abs(got - exact).max() <= 1.5 * torch_bf16
    assert np.abs(got - fp32).max() > 1e-4


def test_scale_attribute_and_large_scores():
    """A given scale replaces 1/sqrt(D); with scores in the hundreds (massive activations) the
    kernel stays as close to the float64 result as torch's own fp32 SDPA is (the scores' fp32
    rounding, ~1e-4 here, bounds both)."""
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 2, 90, 64), dtype=np.float32) * 6
    k = rng.standard_normal((1, 1, 90, 64), dtype=np.float32) * 6
    v = rng.standard_normal((1, 1, 90, 64), dtype=np.float32)
    (got,) = _session(scale=0.5).run(None, {"q": q, "k": k, "v": v})
    exact = _reference(q, k, v, scale=0.5)
    torch_fp32 = np.abs(_reference(q, k, v, scale=0.5, dtype=torch.float32) - exact).max()
    assert np.abs(got - exact).max() <= max(2e-5, 1.5 * torch_fp32)
    (default,) = _session().run(None, {"q": q, "k": k, "v": v})
    assert np.abs(default - got).max() > 0.1  # the attribute changed the result


def test_inconsistent_shapes_are_refused():
    q = np.zeros((1, 4, 10, 64), np.float32)
    k = np.zeros((1, 2, 9, 64), np.float32)
    with pytest.raises(Exception, match="k and v must be"):
        _session().run(None, {"q": q, "k": k, "v": k})
    k3 = np.zeros((1, 3, 10, 64), np.float32)
    with pytest.raises(Exception, match="multiple of KV heads"):
        _session().run(None, {"q": q, "k": k3, "v": k3})


def test_library_is_cached_and_rebuilt_per_source(tmp_path, monkeypatch):
    """Built once per (source, flags, CPU) into the cache; a missing compiler is a clear error."""
    monkeypatch.setenv("STRUCTKV_CACHE", str(tmp_path))
    first = ort_ops.library_path()
    assert first.is_file() and first.is_relative_to(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert ort_ops.library_path() == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp files left
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("STRUCTKV_CACHE", str(tmp_path / "other"))
    with pytest.raises(ort_ops.StructKVError, match="building the structkv attention operator"):
        ort_ops.library_path()
    # A prebuilt library serves machines without a compiler; a wrong path is named.
    monkeypatch.setenv("STRUCTKV_ORT_OPS_LIB", str(first))
    assert ort_ops.library_path() == first
    monkeypatch.setenv("STRUCTKV_ORT_OPS_LIB", str(tmp_path / "missing.so"))
    with pytest.raises(ort_ops.StructKVError, match="is not a file"):
        ort_ops.library_path()


def test_loading_the_library_keeps_the_process_float_environment():
    """Loading the operator library (what Engine.load does) must not switch the process to
    flush-to-zero / denormals-are-zero: -ffast-math on the link line did (crtfastmath.o), and
    every subnormal in the user's process became 0. Checked in a fresh interpreter."""
    import subprocess
    import sys

    library = ort_ops.library_path()
    code = (
        "import ctypes, numpy as np\n"
        "tiny = lambda: bool(np.float32(1e-40) * np.float32(1.0) != 0)\n"
        "before = tiny()\n"
        f"ctypes.CDLL({str(library)!r})\n"
        "print(before, tiny())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"], out.stdout
