"""Model loading: families, aliases, the embedded GGUF, and every method on the real model."""

from __future__ import annotations

import pytest

from structkv.errors import StructKVError
from structkv.methods import METHODS
from structkv.models import TINY_CONFIGS, check_architecture, load, smollm2_gguf_path
from structkv.selection import budget, selected_count


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tiny_families_load_with_their_layouts(name):
    lm = load(name)
    cfg = lm.config
    assert cfg.model_type == TINY_CONFIGS[name]["model_type"]
    attn = lm.model.model.layers[0].self_attn
    # Qwen2 has q/k/v biases; Llama and Mistral have none. GQA for Llama/Qwen2, MHA for Mistral.
    has_bias = name == "tiny-qwen2"
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert (proj.bias is not None) == has_bias
    assert attn.o_proj.bias is None
    expected_kv = 4 if name == "tiny-mistral" else 2
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, expected_kv)


def test_check_architecture_message():
    class Cfg:
        model_type = "falcon"

    with pytest.raises(StructKVError, match="unsupported architecture 'falcon'; supported: llama"):
        check_architecture(Cfg())


def test_embedded_gguf_is_found():
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6


@pytest.mark.real_model
def test_real_model_config(smollm2):
    cfg = smollm2.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.rope_parameters["rope_theta"] == 100000.0


@pytest.fixture(scope="module")
def needle_2k(smollm2, tmp_path_factory):
    from structkv.prompts.needle import make_needle_prompt

    needle = make_needle_prompt(smollm2.tokenizer, 2048, 0.5, seed=1, haystack="noise")
    path = tmp_path_factory.mktemp("prompt") / "needle-2k.txt"
    path.write_text(needle.prompt)
    return path


@pytest.mark.real_model
def test_every_method_on_a_2k_needle_prompt(smollm2, needle_2k):
    """Every registered method on the embedded model, 8 new tokens, in one shared prefill (the
    CLI path itself is covered by test_cli's subprocess run and the engine end-to-end test):
    KV bytes, per-layer counts and budgets as each method defines them."""
    from structkv.generate import encode_prompt, eos_token_ids, generate_many
    from structkv.methods import get_method
    from structkv.profile import resolve_method

    ids = encode_prompt(smollm2.tokenizer, needle_2k.read_text(), chat=True)
    methods = [resolve_method(get_method(name), smollm2.model_id) for name in METHODS]
    gens = generate_many(smollm2.model, ids, methods, 8, eos_token_ids(smollm2))
    for name, gen in zip(METHODS, gens, strict=True):
        stats, n = gen.stats_json(), int(ids.shape[0])
        text = smollm2.tokenizer.decode(gen.tokens, skip_special_tokens=True)
        assert 2000 <= n <= 2200 and text, name
        assert stats["method"] == name and 1 <= stats["new_tokens"] <= 8
        kept = stats["kv_tokens_per_layer"]
        per_token = 2 * 3 * 64 * 4  # K and V, 3 KV heads, head dim 64, fp32
        assert stats["kv_bytes"] == sum(kept) * per_token, name
        assert stats["kv_bytes_full"] == 30 * n * per_token, name
        if name == "full":
            assert kept == [n] * 30
        elif name == "pyramidkv":
            assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]
        elif name == "gemfilter":  # the re-run on the selected tokens keeps all of them
            assert kept == [stats["propagated_tokens"]] * 30
        else:  # the budgets each method resolved to (structkv's from the shipped profile)
            m = dict(zip(METHODS, methods))[name]
            want = selected_count(n, budget(m.r_kv, n), m.window, m.chunk)
            assert kept == [want] * 30, name


@pytest.mark.parametrize(
    ("flags", "warned"),
    [("flags : fpu avx2 fma", True), ("flags : avx2 avx512f avx512_bf16", False),
     ("flags : avx2 avx512f amx_bf16 amx_tile", False)],
)  # fmt: skip
def test_bf16_on_a_cpu_without_bf16_units_is_warned_about(flags, warned, monkeypatch, capsys):
    """bf16 in torch is 2.3x faster than fp32 with AVX512-BF16/AMX and converted element by
    element without them (90x slower in a matmul on an AVX2 EPYC): loading a model in bf16 on
    such a CPU says so, once, on stderr; fp32 never does."""
    import torch

    from structkv.kernels import ort_ops

    monkeypatch.setattr(ort_ops, "cpu_flags", lambda: flags)
    lm = load("tiny-llama", dtype=torch.bfloat16)
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    err = capsys.readouterr().err
    assert ("no AVX512-BF16 or AMX" in err) is warned and err.count("warning") == int(warned)
    load("tiny-llama")
    assert "warning" not in capsys.readouterr().err
