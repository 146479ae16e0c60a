"""Shared fixtures: tiny random models of each supported family, built in-process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# OpenAI Triton kernels (structkv.kernels.select_triton) run through Triton's interpreter on CPU
# tensors: decided when the kernels are defined, so before any test imports them.
os.environ.setdefault("TRITON_INTERPRET", "1")

from structkv.models import load, tiny_model


class ByteTokenizer:
    """Just enough of a HF tokenizer for tiny models: one token per byte (vocab 256)."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="ignore")


FAMILIES = ("tiny-llama", "tiny-qwen2", "tiny-mistral")


@pytest.fixture(scope="session", params=FAMILIES)
def tiny(request):
    return tiny_model(request.param, num_layers=6, seed=1)


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("tiny-llama", num_layers=6, seed=1)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M (loaded once per session; a few seconds from the cache)."""
    return load("smollm2-135m")


_EXPORTS: dict[tuple[str, str], Path] = {}


def exported_engine(family: str, attention: str, tmp_path_factory) -> Path:
    """A tiny engine (pivot 2, λ 0.5), exported once per test session and shared by modules."""
    from structkv.export.exporter import ExportSettings, export_engine
    from structkv.methods import StructKV

    key = (family, attention)
    if key not in _EXPORTS:
        out = tmp_path_factory.mktemp("engines") / f"{family}-{attention}"
        settings = ExportSettings(StructKV(pivot=2, lam=0.5), attention=attention)
        export_engine(family, out, settings, log=lambda m: None, progress=False)
        _EXPORTS[key] = out
    return _EXPORTS[key]


@pytest.fixture(scope="session")
def chunk_engine(tmp_path_factory):
    """A tiny engine with span-preserving selection (4-layer Llama, pivot 2, λ 0.5, chunks of 16,
    window 8), attention spelled out as TensorRT parses it: tests/test_export.py checks it
    against the torch method, tests/test_export_tensorrt.py against its plugin-node twin."""
    from structkv.export.exporter import ExportSettings, export_engine
    from structkv.methods import StructKV

    out = tmp_path_factory.mktemp("chunked") / "engine"
    settings = ExportSettings(StructKV(pivot=2, lam=0.5, chunk=16), attention="explicit")
    export_engine("tiny-llama-L4-s0", out, settings, log=lambda m: None, progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_serving_engine(smollm2, tmp_path_factory):
    """The embedded model exported with a 10 % KV cache, single tokens and window 8
    (`--r-struct 0.2 --r-kv 0.1 --chunk 0 --window 8 --pooling 7`; pivot and λ from the
    profile): the server tests size their pools in blocks of what such requests keep (e.g. 22
    blocks: two compressed 1K prompts fit, a third waits) and send prompts as short as 20
    tokens, whatever budgets the shipped profile has (its window 32 alone adds 24 tokens to
    every layer's cache and to the shortest prompt an engine takes)."""
    from structkv.export.exporter import main as export

    out = tmp_path_factory.mktemp("smollm2-serving") / "engine"
    knobs = ["--r-struct", "0.2", "--r-kv", "0.1", "--chunk", "0"]
    knobs += ["--window", "8", "--pooling", "7"]
    assert export(["--model", "smollm2-135m", *knobs, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def smollm2_engine(smollm2, tmp_path_factory):
    """The embedded model exported with the CLI's defaults (`structkv-export --model
    smollm2-135m`), once per session: the end-to-end test and the server tests share it."""
    from structkv.export.exporter import main as export

    out = tmp_path_factory.mktemp("smollm2") / "engine"
    assert export(["--model", "smollm2-135m", "--out", str(out)]) == 0
    return out
