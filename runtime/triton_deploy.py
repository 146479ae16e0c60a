"""``structkv deploy triton``: write a Triton Inference Server model repository for an engine.

Triton is the serving system our users already run across GPUs and machines; StructKV plugs into
it as a Python-backend model in *decoupled* mode (one response per generated token, then a final
one flagged complete) whose ``execute`` hands requests to the same continuous-batching
:class:`~structkv.runtime.scheduler.Scheduler` that ``structkv serve`` uses. The repository is::

    REPO/
      README.md                 how to start tritonserver on it
      NAME/
        config.pbtxt            decoupled Python backend, the I/O table below, instance_group
        1/model.py              imports structkv.runtime.triton_model.TritonPythonModel
        1/engine/               the engine itself with --copy (else config points at it)

The inputs follow the names Triton's LLM backends use (``text_input``, ``max_tokens``, ...), so
``/v2/models/NAME/generate`` and ``generate_stream`` requests written for them work unchanged.
:data:`INPUTS` and :data:`OUTPUTS` are the one table: config.pbtxt is written from it and the
model parses requests with it.

Only what runs is offered: the Python backend over ONNX Runtime, on CPU or with the CUDA
execution provider (``--device cuda``: KIND_GPU instances, one engine per GPU instance).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from structkv.errors import StructKVError
from structkv.manifest import read_manifest


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton config data type
    dims: tuple[int, ...]
    optional: bool = False
    default: object = None
    doc: str = ""


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_input", "TYPE_STRING", (1,), doc="the prompt (UTF-8), tokenised as-is"),
    TensorSpec("max_tokens", "TYPE_INT32", (1,), True, 16, "tokens to generate at most"),
    TensorSpec("temperature", "TYPE_FP32", (1,), True, 0.0, "0 = greedy"),
    TensorSpec("top_p", "TYPE_FP32", (1,), True, 1.0, "nucleus sampling mass"),
    TensorSpec("seed", "TYPE_INT64", (1,), True, None, "sampling seed"),
    TensorSpec("stop", "TYPE_STRING", (-1,), True, (), "up to 4 stop strings"),
    TensorSpec("stream", "TYPE_BOOL", (1,), True, False, "one response per token"),
    TensorSpec(
        "exclude_input_in_output", "TYPE_BOOL", (1,), True, False,
        "without stream: text_output omits the prompt",
    ),
)  # fmt: skip

OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_output", "TYPE_STRING", (-1,), doc="new text (stream: this token's delta)"),
    TensorSpec("finish_reason", "TYPE_STRING", (1,), doc="stop | length | abort (final only)"),
    TensorSpec("prompt_tokens", "TYPE_INT32", (1,), doc="prompt length"),
    TensorSpec("completion_tokens", "TYPE_INT32", (1,), doc="tokens generated"),
    TensorSpec("pivot_layer", "TYPE_INT32", (1,), doc="where the prompt was compacted"),
    TensorSpec("propagated_tokens", "TYPE_INT32", (1,), doc="tokens run past the pivot"),
    TensorSpec("kv_bytes", "TYPE_INT64", (1,), doc="KV cache kept for the prompt"),
    TensorSpec("kv_bytes_full", "TYPE_INT64", (1,), doc="KV cache of full context"),
    TensorSpec("compute_fraction", "TYPE_FP32", (1,), doc="prefill FLOPs vs full context"),
    TensorSpec("prefill_s", "TYPE_FP32", (1,), doc="prefill wall time"),
)

DEVICES = {"cpu": "KIND_CPU", "cuda": "KIND_GPU"}
#: The engine runtimes a repository can use. TensorRT engines join when plugins_trt does.
BACKENDS = ("onnxruntime",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

MODEL_PY = """\
# Written by `structkv deploy triton`. The model's code is versioned with the structkv package
# (installed in the Python environment tritonserver's Python backend runs in).
from structkv.runtime.triton_model import TritonPythonModel  # noqa: F401
"""


def check_name(name: str) -> str:
    """Triton model names become directory names and URL path segments: keep them plain."""
    if not _NAME.match(name or "") or name in (".", ".."):
        raise StructKVError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting "
            "with a letter or digit (it is a directory and a URL segment)"
        )
    return name


def _dims(dims: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def config_pbtxt(
    name: str,
    engine_ref: str,
    instances: int,
    kv_cache_mb: float,
    device: str,
    threads: int,
    backend: str = "onnxruntime",
) -> str:
    """The model configuration (protobuf text format) for the decoupled Python backend."""

    def tensor(spec: TensorSpec, optional_field: bool) -> str:
        opt = "\n    optional: true" if optional_field and spec.optional else ""
        return (
            f'  {{\n    name: "{spec.name}"\n    data_type: {spec.dtype}\n'
            f"    dims: {_dims(spec.dims)}{opt}\n  }}"
        )

    def param(key: str, value: object) -> str:
        text = json.dumps(str(value))
        return f'parameters: {{\n  key: "{key}"\n  value: {{ string_value: {text} }}\n}}'

    inputs = ",\n".join(tensor(s, True) for s in INPUTS)
    outputs = ",\n".join(tensor(s, False) for s in OUTPUTS)
    return f"""# Written by `structkv deploy triton`; see ../README.md.
name: "{name}"
backend: "python"
max_batch_size: 0
# One response per generated token, then a final response flagged complete.
model_transaction_policy {{
  decoupled: true
}}
input [
{inputs}
]
output [
{outputs}
]
instance_group [
  {{
    count: {instances}
    kind: {DEVICES[device]}
  }}
]
{param("engine", engine_ref)}
{param("kv_cache_mb", kv_cache_mb)}
{param("threads", threads)}
{param("runtime", backend)}
"""


def readme(name: str, engine_ref: str, copied: bool, device: str, instances: int) -> str:
    rows = "\n".join(
        f"| `{s.name}` | {s.dtype[5:]} | {list(s.dims)} | "
        f"{'optional, default ' + repr(s.default) if s.optional else 'required'} | {s.doc} |"
        for s in INPUTS
    )
    outs = "\n".join(f"| `{s.name}` | {s.dtype[5:]} | {s.doc} |" for s in OUTPUTS)
    where = "copied into `1/engine/`" if copied else f"referenced at `{engine_ref}`"
    return f"""# Triton model repository: `{name}` (StructKV)

Written by `structkv deploy triton`. The engine is {where}. {instances} instance(s) of kind
{DEVICES[device]}; each instance loads the engine and its own paged KV pool.

## Start the server

The Python backend runs `{name}/1/model.py` in the Python environment that has `structkv`
installed (with onnxruntime, or onnxruntime-gpu for `--device cuda`).

- Triton container (`nvcr.io/nvidia/tritonserver:<yy.mm>-py3`): `pip install structkv` in it
  (the same version that wrote this repository), then
  `tritonserver --model-repository $PWD`.
- Without a container, from a structkv checkout (the tritonserver bundled in nvidia-pytriton):
  `python scripts/make_peer_env.py .venv-triton --extra tritonserver`, then
  `scripts/triton_server.sh $PWD 8000 8001 8002`.

## Requests

```bash
curl -s localhost:8000/v2/models/{name}/generate \\
  -d '{{"text_input": "The capital of France is", "max_tokens": 16}}'
curl -sN localhost:8000/v2/models/{name}/generate_stream \\
  -d '{{"text_input": "The capital of France is", "max_tokens": 16, "stream": true}}'
```

| input | type | dims | | meaning |
|---|---|---|---|---|
{rows}

| output | type | meaning |
|---|---|---|
{outs}

Streaming responses carry `text_output` only; the final response (flagged complete) carries
`finish_reason` and the per-request numbers. A cancelled request (gRPC stream closed with
`cancel_requests=True`) releases its KV blocks within one scheduler step. Metrics:
`structkv_requests_running`, `structkv_requests_waiting`, `structkv_kv_blocks_used`,
`structkv_kv_blocks_free` on Triton's metrics port.
"""


def _same_or_inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def write_repository(
    engine: str | Path,
    out: str | Path,
    name: str = "structkv",
    instances: int = 1,
    kv_cache_mb: float = 512,
    device: str = "cpu",
    threads: int = 0,
    copy: bool = False,
    force: bool = False,
    backend: str = "onnxruntime",
) -> Path:
    """Write the repository atomically (a temporary sibling renamed into place): an interrupted
    run never leaves a half-written repository, and ``--force`` replaces an old one whole."""
    check_name(name)
    if not isinstance(instances, int) or not 1 <= instances <= 64:
        raise StructKVError(f"--instances must be in 1..64, got {instances!r}")
    if not kv_cache_mb > 0:
        raise StructKVError(f"--kv-cache-mb must be > 0, got {kv_cache_mb!r}")
    if not isinstance(threads, int) or threads < 0:
        raise StructKVError(f"--threads must be >= 0 (0: cores / instances), got {threads!r}")
    if backend not in BACKENDS:
        raise StructKVError(
            f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r} (the TensorRT "
            "variant comes with the TensorRT plugin)"
        )
    if device not in DEVICES:
        raise StructKVError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    engine, out = Path(engine).resolve(), Path(out).resolve()
    if not engine.is_dir():
        raise StructKVError(f"engine directory {engine} does not exist; export one first")
    manifest = read_manifest(engine, verify=True)  # missing or tampered files are refused here
    if not manifest.get("tokenizer"):
        raise StructKVError(
            f"engine {engine} has no tokenizer; Triton's text_input needs one (export from a "
            "model that has a tokenizer)"
        )
    if _same_or_inside(engine, out):
        raise StructKVError(f"--out {out} holds the engine itself; choose another directory")
    if out.exists() and not out.is_dir():
        raise StructKVError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise StructKVError(
            f"--out {out} exists and is not empty; pass --force to replace it, or choose "
            "another directory"
        )
    parent = out.parent
    if not parent.is_dir():
        raise StructKVError(f"the parent of --out ({parent}) does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StructKVError(f"cannot write in {parent} (permission denied); choose another --out")

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        version = tmp / name / "1"
        version.mkdir(parents=True)
        if copy:
            shutil.copytree(engine, version / "engine")
            read_manifest(version / "engine", verify=True)  # the copy is whole
            engine_ref = "1/engine"
        else:
            engine_ref = str(engine)
        (version / "model.py").write_text(MODEL_PY)
        (tmp / name / "config.pbtxt").write_text(
            config_pbtxt(name, engine_ref, instances, kv_cache_mb, device, threads, backend)
        )
        (tmp / "README.md").write_text(readme(name, engine_ref, copy, device, instances))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the server may run as another user
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            out.rename(old / out.name)
            try:
                tmp.rename(out)
            except OSError:
                (old / out.name).rename(out)  # put the previous repository back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StructKVError(f"could not write the repository at {out}: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
