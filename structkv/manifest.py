"""``manifest.json``: what an engine is, how it was made, and the hashes that prove it intact.

The runtime refuses an engine whose manifest is from a newer format, was edited after export
(``manifest_sha256``: the manifest's own content, so a hand-edited dtype, pivot, shape or hash is
caught even though the files it describes are intact), or whose files are missing or differ
from the recorded sha256, with a message that names the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from structkv.errors import StructKVError
from structkv.paths import write_json_atomic

#: 2: "method" is the method's own configuration (``Method.to_dict``), "pivot_source" beside it.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
_DTYPES = {1: "float32", 7: "int64", 10: "float16", 16: "bfloat16", 9: "bool", 6: "int32"}


def describe_io(proto) -> dict:
    """Graph inputs/outputs: name, shape (ints or symbolic names) and dtype."""

    def one(value) -> dict:
        t = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": value.name, "shape": shape, "dtype": _DTYPES.get(t.elem_type, t.elem_type)}

    return {
        "inputs": [one(v) for v in proto.graph.input],
        "outputs": [one(v) for v in proto.graph.output],
    }


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


#: The manifest's checksum of its own content (every other field), written last.
SELF_HASH = "manifest_sha256"


def content_hash(manifest: dict) -> str:
    """sha256 of the manifest without :data:`SELF_HASH`, in a canonical JSON spelling."""
    body = {k: v for k, v in manifest.items() if k != SELF_HASH}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_manifest(
    directory: Path,
    *,
    model_id: str,
    config: dict,
    method,
    pivot_source: str,
    profile: dict | None,
    dtype: str,
    graphs: dict,
    export_stats: dict,
    attention: str = "onnx",
    target: str = "onnxruntime",
    quant: dict | None = None,
) -> dict:
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_id": model_id,
        "config": config,
        "dtype": dtype,
        "attention": attention,
        "target": target,
        "quant": quant,
        "method": method.to_dict(),
        "pivot_source": pivot_source,
        "calibration": None
        if profile is None
        else {
            k: profile.get(k)
            for k in (
                "pivot",
                "lambda",
                "rule",
                "l_min",
                "l_max",
                "metric_scales",
                "objective",
                "settings",
                "best",
                "paper_preset",
                "table",
            )
        },
        "max_prompt_tokens": config.get("max_position_embeddings"),
        "graphs": graphs,
        "tokenizer": sorted(f for f in files if f.startswith("tokenizer/")),
        "files": {f: sha256(directory / f) for f in files},
        "sizes": {f: (directory / f).stat().st_size for f in files},
        "export": export_stats,
    }
    manifest = json.loads(json.dumps(manifest, default=str))  # as it will be read back
    manifest[SELF_HASH] = content_hash(manifest)
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: Path, verify: bool = True) -> dict:
    """The manifest of an engine directory, after checking version, presence and hashes."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise StructKVError(
            f"{directory} is not a StructKV engine (no {MANIFEST}); export one with "
            f"structkv-export --model M --out {directory}"
        )
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StructKVError(f"{path} is not valid JSON ({e}); re-export the engine") from None
    except OSError as e:
        raise StructKVError(
            f"cannot read {path} ({e.strerror or e}); check its permissions"
        ) from None
    if not isinstance(manifest, dict):
        raise StructKVError(f"{path} is not an engine manifest (a JSON object); re-export it")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StructKVError(
            f"{path} has no valid format_version ({version!r}); it is not a StructKV engine "
            "manifest or it was damaged: re-export the engine"
        )
    if version > FORMAT_VERSION:
        raise StructKVError(
            f"engine format {version!r} is newer than this structkv reads ({FORMAT_VERSION}); "
            "upgrade structkv (pip install -U structkv) or re-export with this version"
        )
    if SELF_HASH in manifest and manifest[SELF_HASH] != content_hash(manifest):
        raise StructKVError(
            f"{path} was edited after export (its content does not match its {SELF_HASH}); "
            "a hand-edited dtype, pivot, shape or hash would run graphs that do not match it: "
            "re-export the engine"
        )
    if version == 1:
        manifest = _upgrade_v1(manifest)
    sizes = manifest.get("sizes", {})
    for name, digest in manifest.get("files", {}).items():
        file = directory / name
        if not file.is_file():
            raise StructKVError(f"engine file {name} is missing from {directory}; re-export it")
        size = file.stat().st_size
        if name in sizes and size != sizes[name]:  # cheap, so checked even without hashing
            raise StructKVError(
                f"engine file {name} is {size} bytes, the manifest says {sizes[name]} "
                "(truncated or extended, e.g. an interrupted copy); re-export the engine or "
                "copy it again"
            )
        if verify and sha256(file) != digest:
            raise StructKVError(
                f"engine file {name} does not match its sha256 in {MANIFEST} (modified or "
                "corrupt); re-export the engine"
            )
    return manifest


def _upgrade_v1(manifest: dict) -> dict:
    """Format 1 spelled the method by hand ("lambda", "pivot_source" inside it)."""
    m = dict(manifest["method"])
    manifest["pivot_source"] = m.pop("pivot_source", None)
    m["lam"] = m.pop("lambda", None)
    manifest["method"] = m
    return manifest


def method_from_manifest(manifest: dict):
    """The :class:`~structkv.methods.StructKV` configuration an engine was exported with (the
    same type the CLI and the torch path use), validated as it is read."""
    from structkv.methods import method_from_dict

    try:
        return method_from_dict(manifest["method"])
    except (KeyError, TypeError) as e:
        raise StructKVError(f"engine manifest has no valid method ({e}); re-export it") from None
