"""Model loading: families, aliases, the embedded GGUF, and every method on the real model."""

from __future__ import annotations

import json
import math

import pytest

from structkv.errors import StructKVError
from structkv.methods import METHODS
from structkv.models import TINY_CONFIGS, check_architecture, load, smollm2_gguf_path


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tiny_families_load_with_their_layouts(name):
    lm = load(name)
    cfg = lm.config
    assert cfg.model_type == TINY_CONFIGS[name]["model_type"]
    assert lm.model.model.layers[0].self_attn.q_proj.bias is not None or name != "tiny-qwen2"


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
    from structkv.eval.needle import make_needle_prompt

    needle = make_needle_prompt(smollm2.tokenizer, 2048, 0.5, seed=1, haystack="noise")
    path = tmp_path_factory.mktemp("prompt") / "needle-2k.txt"
    path.write_text(needle.prompt)
    return path


@pytest.mark.real_model
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_from_the_cli_on_a_2k_needle_prompt(name, needle_2k, capsys):
    """`structkv generate --model smollm2-135m --method M --chat --json`, 24 new tokens."""
    from structkv.cli import main

    argv = ["generate", "--model", "smollm2-135m", "--method", name, "--chat", "--json"]
    argv += ["--prompt-file", str(needle_2k), "--max-new-tokens", "24"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    stats, n = out["stats"], out["stats"]["prompt_tokens"]
    assert 2000 <= n <= 2200 and out["text"]
    assert 1 <= stats["new_tokens"] <= 24
    kept = stats["kv_tokens_per_layer"]
    per_token = 2 * 3 * 64 * 4  # K and V, 3 KV heads, head dim 64, fp32
    assert stats["kv_bytes"] == sum(kept) * per_token
    assert stats["kv_bytes_full"] == 30 * n * per_token
    if name == "full":
        assert kept == [n] * 30
    elif name == "pyramidkv":
        assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]
    elif name == "gemfilter":  # the re-run on the selected tokens keeps all of them
        assert kept == [stats["propagated_tokens"]] * 30
    else:
        assert kept == [math.ceil(0.1 * n) + 8] * 30
