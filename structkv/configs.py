"""The ``config.json`` of each alias's checkpoint, as its model card publishes it.

Why here: nothing may be downloaded at run time, yet export must handle each family's real
config (rope scaling, sliding window, QKV bias, tied or untied embeddings, head_dim). Tests
and ``scripts/synthetic_checkpoint.py`` write these configs — scaled down with
:func:`scaled` or at full width with fewer layers — next to random safetensors weights, so
that every code path that reads a real checkpoint directory runs on the real config keys.
"""

from __future__ import annotations

import copy

_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "initializer_range": 0.02,
    "max_window_layers": 70,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "use_sliding_window": False,
    "use_cache": True,
    "torch_dtype": "bfloat16",
}

ALIAS_CONFIGS: dict[str, dict] = {
    "qwen2.5-7b": {
        **_QWEN2,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "max_position_embeddings": 32768,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "vocab_size": 152064,
    },
    "qwen2.5-32b": {
        **_QWEN2,
        "hidden_size": 5120,
        "intermediate_size": 27648,
        "max_position_embeddings": 32768,
        "num_attention_heads": 40,
        "num_hidden_layers": 64,
        "num_key_value_heads": 8,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "vocab_size": 152064,
    },
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    },
    "ministral-8b": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 12288,
        "max_position_embeddings": 32768,
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 131072,
    },
}


def scaled(alias: str, layers: int, width: int = 1, vocab: int | None = None) -> dict:
    """``alias``'s config with ``layers`` layers and every width divided by ``width`` (heads
    and KV heads kept in their ratio, head_dim kept where the config spells it) and, if given,
    ``vocab`` tokens. Everything else — rope scaling, sliding window, biases, tying — as
    published."""
    cfg = copy.deepcopy(ALIAS_CONFIGS[alias])
    cfg["num_hidden_layers"] = layers
    if width > 1:
        heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        head_dim = cfg.get("head_dim", cfg["hidden_size"] // heads)
        group = heads // kv
        kv = max(1, kv // width)
        cfg["num_key_value_heads"] = kv
        cfg["num_attention_heads"] = kv * group
        if "head_dim" in cfg:
            cfg["head_dim"] = max(8, head_dim // width)
            cfg["hidden_size"] = max(64, cfg["hidden_size"] // width)
        else:
            cfg["hidden_size"] = kv * group * max(8, head_dim // width)
        cfg["intermediate_size"] = max(64, cfg["intermediate_size"] // width)
    if vocab is not None:
        cfg["vocab_size"] = vocab
        cfg["bos_token_id"] = cfg["eos_token_id"] = 1
    return cfg
