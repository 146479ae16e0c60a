"""TensorRT-RTX (no GPU needed to build for SM80) parses every plugin-free graph of an engine
and builds what it supports; scripts/trt_rtx_smoke.py reports the rest with TensorRT's error.
TensorRT-RTX has no plugin support, so compact / kv_select are not tried here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX not installed (pip install tensorrt-rtx)")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fp16_engine(tmp_path_factory) -> Path:
    from structkv.export.exporter import ExportSettings, export_engine
    from structkv.methods import StructKV

    out = tmp_path_factory.mktemp("rtx") / "tiny-llama-fp16"
    settings = ExportSettings(StructKV(pivot=2, lam=0.5), dtype="fp16", attention="onnx")
    export_engine("tiny-llama", out, settings, log=lambda m: None, progress=False)
    return out


def _smoke(engine: Path, tmp_path: Path, want=("pre_pivot", "post_pivot", "decode")) -> dict:
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "trt_rtx_smoke.py"), "--engine", str(engine),
         "--arch", "80", "--out", str(report)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)  # the per-graph report (what TensorRT-RTX refuses, if anything)
    graphs = {g["graph"]: g for g in json.loads(report.read_text())["graphs"]}
    assert set(graphs) == set(want)
    assert all(g["parsed"] for g in graphs.values()), graphs
    return graphs


def test_standard_attention_fp16_prefill_graphs_build_for_sm80(fp16_engine, tmp_path):
    """ONNX's Attention operator: TensorRT needs a dedicated kernel (fp16/bf16, no padding
    mask), so the prefill graphs build and the masked decode step is reported, not built."""
    graphs = _smoke(fp16_engine, tmp_path)
    assert graphs["pre_pivot"]["built"] and graphs["post_pivot"]["built"], graphs


def test_explicit_attention_builds_every_graph_in_fp32(tmp_path, tmp_path_factory):
    """``--attention explicit`` (MatMul / Softmax): all three graphs build, fp32 included."""
    from conftest import exported_engine

    graphs = _smoke(exported_engine("tiny-llama", "explicit", tmp_path_factory), tmp_path)
    assert all(g["built"] for g in graphs.values()), graphs


def test_explicit_attention_engine_generates_what_the_standard_one_does(tmp_path_factory):
    import numpy as np
    from conftest import exported_engine

    from structkv.runtime.engine import Engine

    ids = np.random.default_rng(0).integers(0, 256, 300)
    # (the session's contrib engine: GroupQueryAttention, another spelling of the same attention)
    standard = Engine.load(
        exported_engine("tiny-llama", "contrib", tmp_path_factory), kv_cache_mb=8
    )
    explicit = Engine.load(
        exported_engine("tiny-llama", "explicit", tmp_path_factory), kv_cache_mb=8
    )
    assert standard.generate(ids, 16)[0] == explicit.generate(ids, 16)[0]
    a, b = standard.prefill(ids), explicit.prefill(ids)
    assert np.allclose(a.logits, b.logits, atol=1e-4)


def test_a_two_stage_engines_plugin_free_graphs_build_for_sm80(tmp_path):
    """--refine-layer: post_pivot (which also folds the centrality, a Gather by position) and
    post_refine parse and build; refine, a selection, is the plugin's on TensorRT."""
    from structkv.export.exporter import ExportSettings, export_engine
    from structkv.methods import StructKV

    method = StructKV(pivot=1, lam=0.5, r_struct=0.5, r_kv=0.125, refine_layer=3, r_refine=0.25)
    out = tmp_path / "engine"
    export_engine("tiny-llama", out, ExportSettings(method, attention="explicit"),
                  log=lambda m: None, progress=False)  # fmt: skip
    graphs = _smoke(out, tmp_path, ("pre_pivot", "post_pivot", "post_refine", "decode"))
    assert all(g["built"] for g in graphs.values()), graphs
