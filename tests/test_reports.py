"""Analysis reports on a tiny model: files written, numbers consistent with their sources."""

from __future__ import annotations

import json

import pytest
from conftest import ByteTokenizer

from structkv.eval import reports
from structkv.methods import SnapKV
from structkv.models import LoadedModel, tiny_model
from structkv.pivot import offline_pivot, transition_scores


@pytest.fixture(scope="module")
def lm():
    m = tiny_model("tiny-llama", num_layers=10, seed=2)
    return LoadedModel(m.model, ByteTokenizer(), "tiny-reports-test")


def test_pivot_report(lm, tmp_path):
    data = reports.pivot_report(lm, tmp_path, length=200, samples=3)
    assert (tmp_path / "pivot.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "pivot.json").read_text())
    assert saved["search_range"] == [2, 7]
    for prompt in data["prompts"]:
        t = prompt["transition"]
        assert prompt["argmax"] == offline_pivot(t, 2, 7, "argmax")
        assert 3 <= prompt["argmax"] <= 7
    m = data["mean"]
    assert len(m["entropy"]) == 10
    # Each prompt's T_l is that of its own metrics (an independent prefill of the same prompt),
    # and the mean curve is the layer-wise mean of the prompts' curves.
    for prompt in data["prompts"]:
        ids = reports._ids(lm, "niah_single_2", 200, prompt["seed"])
        stats = SnapKV().prefill(lm.model, ids).stats
        expected = transition_scores(list(zip(stats.entropy, stats.sparsity, stats.variance)))
        assert prompt["transition"] == pytest.approx(expected, abs=1e-9)
        assert expected[0] == 0.0 and any(abs(x) > 0 for x in expected[1:])
    by_layer = zip(*(p["transition"] for p in data["prompts"]))
    assert m["transition"] == pytest.approx([sum(c) / len(c) for c in by_layer], abs=1e-12)


def test_latency_report(lm, tmp_path):
    stages = reports.latency_report(lm, ["full", "structkv"], tmp_path, length=200, repeats=1)
    assert (tmp_path / "latency.png").is_file()
    assert stages["full"]["post-pivot layers"] == 0.0 and stages["full"]["pre-pivot layers"] > 0
    assert stages["structkv"]["post-pivot layers"] > 0


def test_fidelity_and_niah_reports(lm, tmp_path):
    fid = reports.fidelity_report(lm, ["full", "snapkv"], tmp_path, length=200, samples=1)
    assert list(fid) == ["snapkv"] and fid["snapkv"]["layer_cosine"][0] == pytest.approx(1.0)
    grid = reports.niah_report(lm, ["full"], tmp_path, [200], [0.2, 0.8], samples=1)
    assert set(grid["full"]) == {"200@0.2", "200@0.8"}
    assert (tmp_path / "niah-full.png").is_file() and (tmp_path / "fidelity.png").is_file()


def test_decoupling_report(lm, tmp_path):
    data = reports.decoupling_report(
        lm, tmp_path, length=200, samples=1, r_structs=(0.2, 1.0), r_kvs=(0.1, 1.0),
        lambdas=(0.5,), pivots=(3,), methods=("full", "snapkv"),
    )  # fmt: skip
    assert set(data["budgets"]) == {"0.2/0.1", "0.2/1.0", "1.0/0.1", "1.0/1.0"}
    assert set(data["lambda_pivot"]) == {"0.5@3"}
    full = data["survival"]["full"]  # the byte tokenizer finds the needle value's tokens
    assert full["propagated"] == 1.0 and full["kv_per_layer"] == [1.0] * 10
    snap = data["survival"]["snapkv"]  # no propagation, per-layer KV survival in [0, 1]
    assert snap["propagated"] == 1.0 and len(snap["kv_per_layer"]) == 10
    assert all(0.0 <= x <= 1.0 for x in snap["kv_per_layer"])
    assert (tmp_path / "decoupling.png").is_file() and (tmp_path / "lambda-pivot.png").is_file()


def test_survival_report_full_keeps_everything_and_streaming_only_the_ends(lm, tmp_path):
    """full keeps every needle token at every stage; streamingllm (sink + recent window) keeps
    none of a needle placed mid-prompt, so its KV survival is 0 in every layer."""
    data = reports.survival_report(
        lm, ["full", "streamingllm"], tmp_path, [300], samples=2, task="niah_single_1"
    )
    saved = json.loads((tmp_path / "survival.json").read_text())
    assert saved["lengths"]["300"]["full"]["accuracy"] == data[300]["full"]["accuracy"]
    full, stream = data[300]["full"], data[300]["streamingllm"]
    assert full["propagated"] == 1.0 and full["kv_per_layer"] == [1.0] * 10
    assert len(stream["propagated_per_sample"]) == 2
    assert stream["propagated"] == 1.0  # streamingllm propagates everything through prefill
    assert stream["kv_per_layer"] == [0.0] * 10


def test_survival_report_gives_the_knobs_to_the_methods_that_have_them(lm, tmp_path):
    """``knobs`` reach each method that has them (SnapKV keeping the whole prompt keeps every
    needle token in every layer, where its default R_KV loses some) and are skipped for a method
    without them (full has no r_kv); the JSON records them."""
    default = reports.survival_report(lm, ["snapkv"], tmp_path, [300], samples=1)
    assert min(default[300]["snapkv"]["kv_per_layer"]) < 1.0
    data = reports.survival_report(
        lm, ["full", "snapkv"], tmp_path, [300], samples=1, knobs={"r_kv": 1.0, "window": 4}
    )
    assert data[300]["snapkv"]["kv_per_layer"] == [1.0] * 10
    assert data[300]["full"]["kv_per_layer"] == [1.0] * 10
    saved = json.loads((tmp_path / "survival.json").read_text())
    assert saved["knobs"] == {"r_kv": 1.0, "window": 4}
