"""Registry-wide checks: budgets, counts, bytes and compute per method; sampling; resume."""

from __future__ import annotations

import math

import pytest
import torch
from reference import assert_matches_hf

from structkv.calibration import compute_fraction, max_pivot_under_cap
from structkv.errors import StructKVError
from structkv.generate import decode_step, forced_logits, generate_ids, generate_many, sample
from structkv.methods import (
    METHODS,
    PyramidKV,
    SnapKV,
    StreamingLLM,
    StructKV,
    get_method,
    prefill_shared,
)
from structkv.models import tiny_model
from structkv.prefill import Compacted, continue_prefill

N, L, W = 120, 6, 8


def _ids(n=N, seed=2):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def _expected_kv_counts(name: str) -> list[int]:
    k = math.ceil(0.1 * N)
    if name == "full":
        return [N] * L
    if name == "gemfilter":
        return [k + W] * L  # the re-run keeps all of its k + w tokens
    if name == "pyramidkv":
        low, high = k / 20, 2 * k - k / 20
        return [round(high - (high - low) * l / (L - 1)) + W for l in range(L)]
    return [k + W] * L


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_keeps_its_budget(tiny_llama, name):
    knobs = {"pivot": 2, "lam": 0.5} if name == "structkv" else {}
    method = get_method(name, **knobs)
    out = method.prefill(tiny_llama.model, _ids())
    assert out.stats.kv_tokens_per_layer == _expected_kv_counts(name)
    g, d = 2, 16  # tiny-llama: 2 KV heads of dim 16
    assert out.stats.kv_bytes == sum(2 * g * d * 4 * t for t in out.stats.kv_tokens_per_layer)
    assert out.stats.kv_bytes_full == 2 * L * g * d * 4 * N
    for layer in out.cache.layers:  # every head: sorted, distinct, within the prompt
        for head in layer.kept_positions().tolist():
            assert head == sorted(set(head)) and 0 <= head[0] and head[-1] < N
    if name in ("fastkv", "structkv", "structkv-paper"):
        pivot = out.stats.pivot_layer
        assert out.stats.propagated_tokens == math.ceil(0.2 * N) + W
        expected = ((pivot + 1) * N + (L - pivot - 1) * (math.ceil(0.2 * N) + W)) / (L * N)
        assert out.stats.compute_fraction == pytest.approx(expected)
    elif name == "gemfilter":
        assert out.stats.compute_fraction == pytest.approx(3 / L + (math.ceil(0.1 * N) + W) / N)
    else:
        assert out.stats.compute_fraction == 1.0


def test_streamingllm_keeps_sinks_and_recent_tokens(tiny_llama):
    out = StreamingLLM(r_kv=0.1, sinks=4).prefill(tiny_llama.model, _ids())
    total = math.ceil(0.1 * N) + W
    expected = list(range(4)) + list(range(N - (total - 4), N))
    for layer in out.cache.layers:
        assert layer.kept_positions().tolist() == [expected, expected]


def test_pyramidkv_total_matches_snapkv():
    k = math.ceil(0.1 * 1000)
    budgets = [PyramidKV(r_kv=0.1).kv_budget(l, 30, 1000) for l in range(30)]
    assert budgets == sorted(budgets, reverse=True)
    assert abs(sum(budgets) - 30 * k) <= 30  # rounding only


def test_continue_prefill_equals_a_direct_prefill(tiny_llama):
    """Calibration's shortcut (post_pivot from a recorded, compacted state) is exact."""
    model, ids = tiny_llama.model, _ids()
    method = StructKV(pivot=2, lam=0.4)
    direct = method.prefill(model, ids)
    keep = torch.tensor(direct.stats.propagated_positions)
    hidden = {}
    # SnapKV selects the early layers' KV exactly as StructKV does before its pivot.
    early = SnapKV().prefill(model, ids, observer=lambda v: hidden.setdefault(v.layer, v.hidden))
    compacted = Compacted(2, hidden[2][:, keep], keep, early.cache.layers[:3])
    resumed = continue_prefill(model, int(ids.shape[0]), method, compacted)
    torch.testing.assert_close(resumed.logits, direct.logits)
    for a, b in zip(resumed.cache.layers, direct.cache.layers, strict=True):
        assert torch.equal(a.kept_positions(), b.kept_positions())


def test_compute_fraction_and_cap_by_hand():
    assert compute_fraction(15, 30, 0.2) == pytest.approx((16 + 14 * 0.2) / 30)
    # (L*+1 + (29-L*)*0.2)/30 <= 0.65  <=>  0.8 L* <= 12.7  <=>  L* <= 15
    assert max_pivot_under_cap(30, 0.2, 0.65) == 15
    # the default cap, 0.6 (the paper's 40% saving): (15 + 15*0.2)/30 is exactly 0.6
    assert max_pivot_under_cap(30, 0.2, 0.6) == 14


def test_sampling():
    logits = torch.tensor([0.1, 3.0, 0.2, 2.9])
    assert sample(logits, 0.0, 1.0, None) == 1
    g = torch.Generator().manual_seed(0)
    # top_p below the top token's mass keeps only the top token
    assert {sample(logits, 1.0, 0.1, g) for _ in range(20)} == {1}
    draws = [sample(logits, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(40)]
    assert {1, 3} <= set(draws)  # both likely tokens get sampled


def test_seeded_generation_is_reproducible(tiny_llama):
    ids = _ids()
    runs = [
        generate_ids(tiny_llama.model, ids, StructKV(pivot=2), 8, temperature=1.0, seed=5).tokens
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    greedy = generate_ids(tiny_llama.model, ids, StructKV(pivot=2), 8).tokens
    out = StructKV(pivot=2).prefill(tiny_llama.model, ids, extra_capacity=8)
    tokens = [int(out.logits.argmax())]
    for _ in range(7):
        tokens.append(int(decode_step(tiny_llama.model, out.cache, tokens[-1]).argmax()))
    assert greedy == tokens


@torch.no_grad()
def test_sliding_window_matches_hf():
    """Mistral-style sliding attention: our position-based masks equal HF's, prefill + decode."""
    lm = tiny_model("tiny-mistral", num_layers=3, seed=4)
    model = lm.model
    model.config.sliding_window = 16
    for layer in model.model.layers:
        layer.self_attn.config.sliding_window = 16
    ids = _ids(n=48)
    out = get_method("full").prefill(model, ids, extra_capacity=4)
    assert_matches_hf(model, out.logits, lambda t: decode_step(model, out.cache, t), ids, 4)


def _check_forced_equals_stepped(model) -> None:
    ids = _ids(n=48)
    answer = [5, 77, 200, 9, 31, 64, 128, 3, 250, 17, 42, 99, 1, 8, 60, 7, 2, 11]
    runs = [StructKV(pivot=2, r_struct=0.5, r_kv=0.5).prefill(model, ids, extra_capacity=18)
            for _ in range(2)]  # fmt: skip
    stepped = torch.stack([decode_step(model, runs[0].cache, t) for t in answer])
    forced = forced_logits(model, runs[1].cache, answer)
    torch.testing.assert_close(forced, stepped, rtol=1e-4, atol=1e-4)
    assert runs[1].cache.next_position == runs[0].cache.next_position
    for a, b in zip(runs[0].cache.layers, runs[1].cache.layers, strict=True):
        assert a.length == b.length
        assert torch.equal(a.kept_positions(), b.kept_positions())
        torch.testing.assert_close(a.keys(), b.keys(), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_forced_logits_equal_decode_steps(tiny):
    """Teacher-forced scoring in one pass (calibration's) gives what feeding the same tokens to
    the decode loop one by one gives — logits, and the cache it leaves (K/V, positions, next
    position) — on a compressed cache with gapped positions."""
    _check_forced_equals_stepped(tiny.model)


@torch.no_grad()
def test_forced_logits_respect_a_sliding_window():
    """The same with a sliding window of 16 that the 18 scored tokens' own span crosses, so
    both the cached tokens and the earliest new ones fall out of the later ones' window."""
    lm = tiny_model("tiny-mistral", num_layers=4, seed=4)
    lm.model.config.sliding_window = 16
    for layer in lm.model.model.layers:
        layer.self_attn.config.sliding_window = 16
    _check_forced_equals_stepped(lm.model)


def test_decode_writes_in_place_and_refuses_past_its_preallocation(tiny_llama):
    """Decoding writes into the preallocated buffers (no reallocation: the same storage before
    and after) and refuses, with the fix, to write past them instead of copying the cache."""
    ids = _ids()
    out = StructKV(pivot=2).prefill(tiny_llama.model, ids, extra_capacity=3)
    layer = out.cache.layers[0]
    storage = layer.k.untyped_storage().data_ptr()
    token = int(out.logits.argmax())
    for _ in range(3):
        token = int(decode_step(tiny_llama.model, out.cache, token).argmax())
    assert layer.k.untyped_storage().data_ptr() == storage
    assert layer.kept_positions()[0, -1] == N + 2 and layer.length == layer.k.shape[2]
    with pytest.raises(StructKVError, match=r"decode cache is full .*extra_capacity"):
        decode_step(tiny_llama.model, out.cache, token)


def test_shared_prefill_equals_separate_runs(tiny_llama):
    """Every registered method, prefilled together (full-length layers shared), gives exactly
    what it gives alone: kept positions, K/V, logits and the stats that describe the method."""
    model, ids = tiny_llama.model, _ids()
    knobs = {"structkv": {"pivot": 2, "lam": 0.5}, "structkv-paper": {"l_min": 1, "l_max": 4}}
    methods = [get_method(name, **knobs.get(name, {})) for name in METHODS]
    shared = prefill_shared(model, ids, methods, extra_capacity=3)
    for method, got in zip(methods, shared, strict=True):
        alone = method.prefill(model, ids, extra_capacity=3)
        assert got.stats.method == method.name
        torch.testing.assert_close(got.logits, alone.logits, rtol=0, atol=0)
        for a, b in zip(got.cache.layers, alone.cache.layers, strict=True):
            assert torch.equal(a.kept_positions(), b.kept_positions())
            assert torch.equal(a.keys(), b.keys()) and torch.equal(a.values(), b.values())
        for field in (
            "pivot_layer",
            "propagated_positions",
            "compute_fraction",
            "lam",
            "kv_tokens_per_layer",
            "entropy",
            "transition",
        ):
            assert getattr(got.stats, field) == getattr(alone.stats, field), (method.name, field)
    pivots = {m.name: r.stats.pivot_layer for m, r in zip(methods, shared)}
    assert pivots["structkv"] == 2 and pivots["fastkv"] == L // 2  # they did branch off
    assert pivots["full"] is None


def test_generate_many_equals_generate_ids(tiny_llama):
    model, ids = tiny_llama.model, _ids()
    methods = [get_method(n) for n in ("full", "snapkv", "fastkv", "gemfilter")]
    many = generate_many(model, ids, methods, max_new_tokens=6)
    for method, got in zip(methods, many, strict=True):
        assert got.tokens == generate_ids(model, ids, method, max_new_tokens=6).tokens


def test_shared_prefill_refuses_mixed_windows(tiny_llama):
    from structkv.prefill import run_prefill_shared

    with pytest.raises(ValueError, match="one window"):
        run_prefill_shared(tiny_llama.model, _ids(), [SnapKV(window=8), SnapKV(window=4)])
    # prefill_shared groups them instead
    both = prefill_shared(tiny_llama.model, _ids(), [SnapKV(window=8), SnapKV(window=4)])
    assert [r.stats.kv_tokens_per_layer[0] for r in both] == [12 + 8, 12 + 4]


@pytest.mark.parametrize("name", list(METHODS))
def test_torch_path_creates_every_tensor_on_the_models_device(name):
    """Device-agnostic: with torch's default device set to "meta", any tensor the prefill or
    decode loop made without ``device=`` would land on meta and fail against the CPU model;
    the tokens must equal a run without that default."""
    lm = tiny_model("tiny-mistral", num_layers=6, seed=1)
    ids = torch.randint(0, 256, (120,), generator=torch.Generator().manual_seed(0))
    method = get_method(name, pivot=2) if "pivot" in METHODS[name].knobs() else get_method(name)
    expected = generate_ids(lm.model, ids, method, 5).tokens
    with torch.device("meta"):
        assert generate_ids(lm.model, ids, method, 5).tokens == expected
