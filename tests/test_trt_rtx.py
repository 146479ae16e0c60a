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


def test_plugin_free_graphs_parse_and_prefill_builds_for_sm80(fp16_engine, tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "trt_rtx_smoke.py"), "--engine", str(fp16_engine),
         "--arch", "80", "--out", str(report)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    graphs = {g["graph"]: g for g in json.loads(report.read_text())["graphs"]}
    print(proc.stdout)  # the per-graph report (what TensorRT-RTX refuses, if anything)
    assert set(graphs) == {"pre_pivot", "post_pivot", "decode"}
    assert all(g["parsed"] for g in graphs.values()), graphs
    assert graphs["pre_pivot"]["built"] and graphs["post_pivot"]["built"], graphs
