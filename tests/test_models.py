"""Model loading: families, aliases, the embedded GGUF, and every method on the real model."""

from __future__ import annotations

import math

import pytest
import torch

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


@pytest.mark.real_model
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_on_the_real_model(smollm2, name):
    from structkv.generate import as_method, encode_prompt, generate_ids

    ids = encode_prompt(smollm2.tokenizer, "The grass is green. " * 100 + "What is green?", True)
    out = generate_ids(smollm2.model, ids, as_method(name, smollm2.model_id), max_new_tokens=4)
    n = int(ids.shape[0])
    assert len(out.tokens) >= 1 and out.stats.prompt_tokens == n
    if name in ("snapkv", "fastkv", "structkv", "structkv-paper", "streamingllm"):
        assert out.stats.kv_tokens_per_layer[0] == math.ceil(0.1 * n) + 8
    assert torch.isfinite(torch.tensor(out.stats.prefill_s))
