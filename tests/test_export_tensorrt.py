"""``structkv-export --target tensorrt``: the selection graphs become StructKVCompact plugin nodes
(what TensorRT's ONNX parser loads with plugins_trt/), every graph passes the full ONNX checker,
and ONNX Runtime — running the plugin node with its reference op — generates exactly what the
plain engine generates."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import exported_engine

from structkv.export.exporter import main as export_cli
from structkv.runtime.engine import Engine

pytest.importorskip("onnxruntime_extensions", reason="pip install onnxruntime-extensions")
PIVOT = ["--pivot", "2", "--lambda", "0.5"]  # the shared tiny engines' method


@pytest.fixture(scope="module")
def trt_engine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trt") / "tiny-llama-trt"
    assert (
        export_cli(["--model", "tiny-llama", "--target", "tensorrt", *PIVOT, "--out", str(out)])
        == 0
    )
    return out


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_selection_graphs_are_one_plugin_node_each(trt_engine, tmp_path_factory):
    manifest = json.loads((trt_engine / "manifest.json").read_text())
    plain = json.loads((exported_engine("tiny-llama", "explicit", tmp_path_factory)
                        / "manifest.json").read_text())  # fmt: skip
    assert manifest["target"] == "tensorrt" and manifest["attention"] == "explicit"
    method = manifest["method"]
    for name, mode, ratio in (
        ("compact", "compact", "r_struct"),
        ("kv_select", "kv_select", "r_kv"),
    ):
        model = onnx.load(str(trt_engine / f"{name}.onnx"))
        (node,) = model.graph.node
        assert (node.op_type, node.domain) == ("StructKVCompact", "trt.plugins")
        attrs = _attrs(node)
        fraction = Fraction(method[ratio]).limit_denominator(1_000_000)
        assert attrs["plugin_namespace"] == b"structkv" and attrs["plugin_version"] == b"1"
        assert attrs["mode"] == mode.encode()
        assert (attrs["ratio_num"], attrs["ratio_den"]) == (
            fraction.numerator,
            fraction.denominator,
        )
        assert attrs["window"] == method["window"] and attrs["pooling"] == method["pooling"]
        assert attrs["pool_mode"] == method["pool_mode"].encode()
        assert attrs["chunk"] == 0  # single tokens, as the method selects them
        # the interface the runtime relies on is unchanged
        assert manifest["graphs"][name] == plain["graphs"][name]
    for graph in ("pre_pivot", "compact", "post_pivot", "kv_select", "decode"):
        onnx.checker.check_model(str(trt_engine / f"{graph}.onnx"), full_check=True)


def test_onnx_runtime_with_the_reference_op_generates_the_plain_engines_tokens(
    trt_engine, tmp_path_factory
):
    plain = Engine.load(exported_engine("tiny-llama", "explicit", tmp_path_factory), kv_cache_mb=8)
    rewritten = Engine.load(trt_engine, kv_cache_mb=8)
    for seed, n in ((0, 300), (1, 1000)):
        ids = np.random.default_rng(seed).integers(0, 256, n)
        assert plain.generate(ids, 12)[0] == rewritten.generate(ids, 12)[0]
        a, b = plain.prefill(ids), rewritten.prefill(ids)
        assert np.array_equal(a.positions, b.positions)  # the same kept tokens, every layer
        assert np.array_equal(a.logits, b.logits)


def test_chunk_mode_plugin_graphs_generate_the_plain_chunk_engines_tokens(chunk_engine, tmp_path):
    """``--chunk 16 --target tensorrt``: the plugin nodes carry the chunk, and ONNX Runtime running
    them with the reference op keeps exactly the whole chunks the plain chunk engine's traced
    graphs keep (every layer's positions), with the same logits and tokens. The plain engine is
    the session's (conftest.chunk_engine: the same model and knobs, explicit attention)."""
    argv = ["--model", "tiny-llama-L4-s0", *PIVOT, "--chunk", "16"]
    assert export_cli([*argv, "--target", "tensorrt", "--out", str(tmp_path / "trt")]) == 0
    for name in ("compact", "kv_select"):
        (node,) = onnx.load(str(tmp_path / "trt" / f"{name}.onnx")).graph.node
        assert _attrs(node)["chunk"] == 16
    plain = Engine.load(chunk_engine, kv_cache_mb=8)
    rewritten = Engine.load(tmp_path / "trt", kv_cache_mb=8)
    assert plain.method.chunk == rewritten.method.chunk == 16
    for seed, n in ((0, 24), (1, 300), (2, 1000)):
        ids = np.random.default_rng(seed).integers(0, 256, n)
        a, b = plain.prefill(ids), rewritten.prefill(ids)
        assert np.array_equal(a.positions, b.positions)
        assert np.array_equal(a.logits, b.logits)
        assert plain.generate(ids, 8)[0] == rewritten.generate(ids, 8)[0]
    head = b.positions[0][0].tolist()  # whole chunks: a kept run of 16 consecutive positions
    assert any(head[i : i + 16] == list(range(head[i], head[i] + 16)) for i in range(len(head)))


def test_target_tensorrt_refuses_attention_tensorrt_cannot_parse(tmp_path, capsys):
    out = tmp_path / "e"
    argv = ["--model", "tiny-llama", "--target", "tensorrt", "--attention", "contrib", *PIVOT]
    assert export_cli([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "TensorRT cannot parse" in err and not out.exists()


def test_dynamic_axes_are_named_for_tensorrt_profiles(trt_engine):
    """TensorRT needs a range per dynamic axis; the manifest names each (ONNX keeps only
    symbols) and the TensorRT backend has a range for every name."""
    from structkv.runtime.stages import _axis_ranges

    manifest = json.loads((trt_engine / "manifest.json").read_text())
    ranges = _axis_ranges(manifest, num_blocks=100, block=16, max_batch=16)
    for name, io in manifest["graphs"].items():
        declared = {i["name"]: i["shape"] for i in io["inputs"]}
        assert set(io["dynamic"]) <= set(declared), name
        for tensor, axes in io["dynamic"].items():
            for axis, dim in axes.items():
                assert dim in ranges, (name, tensor, dim)
                assert not isinstance(declared[tensor][int(axis)], int), (name, tensor, axis)
                lo, opt, hi = ranges[dim]
                assert 1 <= lo <= opt <= hi


def test_tensorrt_backend_without_tensorrt_or_gpu_says_what_is_missing(trt_engine):
    import torch

    from structkv.errors import StructKVError

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: scripts/gpu_check.sh runs the TensorRT backend")
    with pytest.raises(StructKVError, match=r"tensorrt|CUDA"):
        Engine.load(trt_engine, backend="tensorrt", kv_cache_mb=8)
