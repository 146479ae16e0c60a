"""Benchmarks report medians of the runs they made, and ratios paired within the same run."""

from __future__ import annotations

import statistics

import pytest

from structkv.bench import bench_decode, bench_prefill
from structkv.errors import StructKVError
from structkv.profile import find_profile

pytestmark = pytest.mark.real_model


def test_prefill_rows_are_medians_and_paired_ratios(smollm2):
    rows = bench_prefill(smollm2, [256], ["structkv"], repeats=3, warmup=1)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"full", "structkv"}  # full is always added as the reference
    full, skv = by["full"], by["structkv"]
    assert full["speedup_vs_full"] == 1.0
    for r in rows:
        assert len(r["runs_s"]) == 3
        assert r["median_s"] == pytest.approx(statistics.median(r["runs_s"]), abs=1e-4)
    paired = statistics.median(f / t for f, t in zip(full["runs_s"], skv["runs_s"]))
    assert skv["speedup_vs_full"] == pytest.approx(paired, rel=1e-2)
    assert skv["pivot_layer"] == find_profile("smollm2-135m")["pivot"]
    assert full["pivot_layer"] is None
    assert 0 <= skv["overhead_pct"] < 100


def test_decode_rows(smollm2):
    rows = bench_decode(smollm2, 256, ["snapkv"], steps=4, repeats=3)
    by = {r["method"]: r for r in rows}
    n = by["full"]["length"]
    assert by["full"]["kv_tokens_layer0"] == n
    assert by["snapkv"]["kv_tokens_layer0"] == -(-n // 10) + 8
    assert by["full"]["speedup_vs_full"] == 1.0


def test_bench_refuses_too_few_repeats(smollm2):
    with pytest.raises(StructKVError, match="repeats"):
        bench_prefill(smollm2, [256], ["full"], repeats=2)


def test_a_model_without_tokenizer_is_timed_on_random_ids_of_its_vocabulary():
    """Random-weight models of real shapes (the GPU check times them where weights are absent)
    have no tokenizer: the benchmark uses seeded random ids within the vocabulary, of exactly the
    requested length."""
    from structkv.bench import _prompt_ids
    from structkv.models import tiny_model

    lm = tiny_model("tiny-qwen2", num_layers=4)
    ids = _prompt_ids(lm, 300)
    assert (
        ids.shape == (300,)
        and int(ids.max()) < lm.config.vocab_size
        and len(set(ids.tolist())) > 100
    )
    assert ids.device == next(lm.model.parameters()).device
    rows = bench_prefill(lm, [300], ["structkv"], repeats=3, warmup=1)
    assert {r["length"] for r in rows} == {300}
