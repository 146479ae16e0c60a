"""Two-stage engines (``structkv-export --refine-layer R --r-refine r``): the run after the
pivot is split at R into ``post_pivot`` (folding the centrality on), ``refine`` (the second
cut) and ``post_refine``. Checked against the torch method with the same knobs, which
tests/test_refine.py holds to a brute-force float64 reference: the same kept positions in
every layer, the same logits and greedy tokens, the same stats; and the TensorRT target's
plugin-node ``refine`` graph against the plain one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from structkv.export.exporter import ExportSettings, export_engine
from structkv.export.exporter import main as export_cli
from structkv.generate import generate_ids
from structkv.graphs import REFINE_GRAPH_NAMES
from structkv.methods import StructKV
from structkv.models import tiny_model
from structkv.runtime.backends import EngineBackend
from structkv.runtime.engine import Engine

FAMILY = "tiny-llama"  # 6 layers: full length 0..1, propagated 2..3, refined 4..5
KNOBS = dict(pivot=1, lam=0.5, r_struct=0.5, r_kv=0.125, refine_layer=3, r_refine=0.25)
NEW = 8


def _export(out: Path, **over) -> Path:
    settings = ExportSettings(StructKV(**{**KNOBS, **over}), attention="explicit")
    export_engine(FAMILY, out, settings, log=lambda m: None, progress=False)
    return out


@pytest.fixture(scope="module")
def refine_engine(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("refine") / "engine")


@pytest.fixture(scope="module")
def refine_chunk_engine(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("refine-chunk") / "engine", chunk=8)


def _prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def _assert_matches_the_method(engine: Engine, method: StructKV, lengths) -> None:
    model = tiny_model(FAMILY).model
    for n, seed in lengths:
        ids = _prompt(n, seed)
        ref = method.prefill(model, ids)
        got = engine.prefill(ids.numpy())
        np.testing.assert_allclose(got.logits, ref.logits.numpy(), atol=1e-4, rtol=0)
        for layer, lc in enumerate(ref.cache.layers):
            assert np.array_equal(got.positions[layer], lc.kept_positions().numpy()), (n, layer)
        for key in ("propagated_tokens", "refine_layer", "refined_tokens", "kv_tokens_per_layer"):
            assert got.stats[key] == getattr(ref.stats, key), (n, key)
        assert got.stats["compute_fraction"] == pytest.approx(ref.stats.compute_fraction)
        # what the scheduler reserves per layer before admitting the prompt
        assert EngineBackend(engine, "t").kv_tokens(n) == got.positions.shape[-1], n
        want = generate_ids(model, ids, method, NEW).tokens
        assert engine.generate_batch([ids.numpy()], NEW)[0] == want, n  # no stop at EOS


def test_a_two_stage_engine_has_seven_graphs(refine_engine):
    manifest = json.loads((refine_engine / "manifest.json").read_text())
    assert list(manifest["graphs"]) == list(REFINE_GRAPH_NAMES)
    assert (manifest["method"]["refine_layer"], manifest["method"]["r_refine"]) == (3, 0.25)
    for name in REFINE_GRAPH_NAMES:
        onnx.checker.check_model(str(refine_engine / f"{name}.onnx"), full_check=True)
    assert [o["name"] for o in manifest["graphs"]["post_pivot"]["outputs"]][-2:] == [
        "hidden_out",
        "centrality_out",
    ]


def test_two_stage_engine_matches_the_torch_method(refine_engine):
    """ONNX Runtime and the torch stage backend == StructKV with --refine-layer/--r-refine."""
    method = StructKV(**KNOBS)
    lengths = ((40, 3), (100, 0), (173, 1), (251, 2))
    _assert_matches_the_method(Engine.load(refine_engine, kv_cache_mb=8), method, lengths)
    torch_engine = Engine.load(refine_engine, backend="torch", kv_cache_mb=8)
    _assert_matches_the_method(torch_engine, method, lengths[1:2])
    out = Engine.load(refine_engine, kv_cache_mb=8).prefill(_prompt(200, 9).numpy())
    # layers 0..1 on 200 tokens, 2..3 on 100 + 8, 4..5 on 50 + 8; every layer keeps 25 + 8
    assert (out.stats["propagated_tokens"], out.stats["refined_tokens"]) == (108, 58)
    assert out.stats["kv_tokens_per_layer"] == [33] * 6
    assert out.stats["compute_fraction"] == pytest.approx((2 * 200 + 2 * 108 + 2 * 58) / 1200)


def test_two_stage_chunk_engine_matches_the_torch_method(refine_chunk_engine):
    """Chunks of 8 in both cuts and in KV selection: every run of layers keeps the same count
    (the tokens between the last chunk and the window survive each cut)."""
    method = StructKV(**KNOBS, chunk=8)
    engine = Engine.load(refine_chunk_engine, kv_cache_mb=8)
    _assert_matches_the_method(engine, method, ((16, 4), (37, 5), (100, 0), (301, 1)))


def test_tiny_budgets_down_to_one_propagated_token(tmp_path):
    """R_struct 0.1 on a 10-token prompt propagates one token besides the window, fewer than the
    refine graph takes (window + 2): the engine keeps it whole, as any refinement would."""
    knobs = dict(r_struct=0.1, r_refine=0.05, r_kv=0.05)
    engine = Engine.load(_export(tmp_path / "engine", **knobs), kv_cache_mb=8)
    method = StructKV(**{**KNOBS, **knobs})
    _assert_matches_the_method(engine, method, ((10, 6), (30, 7), (100, 0)))
    assert engine.prefill(_prompt(10, 6).numpy()).stats["refined_tokens"] == 9


def test_tensorrt_target_refine_is_a_plugin_node_that_keeps_the_same_tokens(
    refine_chunk_engine, tmp_path
):
    """--target tensorrt: ``refine`` is the plugin's kv_select mode on one row (hidden as keys,
    the centrality as saliency, the budget r_refine of prompt_len) between reshapes; ONNX
    Runtime running it with the reference op keeps what the plain engine keeps."""
    pytest.importorskip("onnxruntime_extensions", reason="pip install onnxruntime-extensions")
    argv = ["--model", FAMILY, "--pivot", "1", "--lambda", "0.5", "--r-struct", "0.5",
            "--r-kv", "0.125", "--refine-layer", "3", "--r-refine", "0.25", "--chunk", "8",
            "--attention", "explicit", "--target", "tensorrt",
            "--out", str(tmp_path / "trt")]  # fmt: skip
    assert export_cli(argv) == 0
    graph = onnx.load(str(tmp_path / "trt" / "refine.onnx")).graph
    assert [n.op_type for n in graph.node] == [
        "Unsqueeze", "Unsqueeze", "StructKVCompact", "Squeeze", "Squeeze",
    ]  # fmt: skip
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in graph.node[2].attribute}
    assert attrs["mode"] == b"kv_select" and (attrs["ratio_num"], attrs["ratio_den"]) == (1, 4)
    assert attrs["chunk"] == 8
    manifest = json.loads((tmp_path / "trt" / "manifest.json").read_text())
    plain = json.loads((refine_chunk_engine / "manifest.json").read_text())
    assert manifest["graphs"]["refine"] == plain["graphs"]["refine"]  # the same interface
    a_engine = Engine.load(refine_chunk_engine, kv_cache_mb=8)
    b_engine = Engine.load(tmp_path / "trt", kv_cache_mb=8)
    for seed, n in ((0, 300), (1, 1000)):
        ids = np.random.default_rng(seed).integers(0, 256, n)
        a, b = a_engine.prefill(ids), b_engine.prefill(ids)
        assert np.array_equal(a.positions, b.positions)
        assert np.array_equal(a.logits, b.logits)
        assert a_engine.generate_batch([ids], NEW)[0] == b_engine.generate_batch([ids], NEW)[0]


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--r-kv", "0.3", "--r-struct", "0.5", "--refine-layer", "3", "--r-refine", "0.25"],
         "must not exceed --r-refine"),
        (["--r-struct", "0.5", "--refine-layer", "5", "--r-refine", "0.25"],
         r"--refine-layer must be in \[2, 4\]"),
        (["--r-struct", "0.5", "--refine-layer", "3"], "go together"),
    ],
)  # fmt: skip
def test_export_refuses_a_schedule_the_engine_cannot_run(argv, match, tmp_path, capsys):
    out = tmp_path / "engine"
    assert export_cli(["--model", FAMILY, "--pivot", "1", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(match, errors[0]), err
    assert not out.exists()
