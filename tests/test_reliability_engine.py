"""Reliability, engines: every file of an engine missing, truncated, extended, bit-flipped;
manifest fields edited (format version, dtype, pivot, shapes, hashes), a manifest that is not
JSON or not an object; graphs swapped between engines; a tokenizer from another model; an
engine of a newer format. Each is one StructKVError naming the file or field and the fix —
before any graph runs — and the CLI turns it into one `error:` line, exit 2."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import exported_engine
from reliability import assert_one_error, case, run_cli

from structkv.cli import main
from structkv.errors import StructKVError
from structkv.manifest import FORMAT_VERSION, MANIFEST
from structkv.runtime.engine import Engine

CLS = "Engine files"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return exported_engine("tiny-llama", "contrib", tmp_path_factory)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    return exported_engine("tiny-qwen2", "auto", tmp_path_factory)


def _files(engine) -> list[str]:
    return sorted(json.loads((engine / MANIFEST).read_text())["files"])


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "extended":
        path.write_bytes(data + b"\0" * 64)
    elif how == "bit-flipped":
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :])
    elif how == "emptied":
        path.write_bytes(b"")


DAMAGE = ("missing", "truncated", "extended", "bit-flipped", "emptied")


@pytest.mark.parametrize("how", DAMAGE)
def test_every_engine_file_damaged_is_refused_by_name(engine, tmp_path, how):
    for name in _files(engine):
        copy = tmp_path / f"e-{how}-{name.replace('/', '_')}"
        shutil.copytree(engine, copy)
        _damage(copy / name, how)
        with case(CLS, f"{name} {how}"):
            expected = {"missing": "is missing", "bit-flipped": "does not match its sha256"}.get(
                how, "bytes, the manifest says"
            )
            with pytest.raises(StructKVError, match=expected) as info:
                Engine.load(copy)
            assert name in str(info.value) and "re-export" in str(info.value)
        if how in ("truncated", "extended", "emptied", "missing"):
            with case(CLS, f"{name} {how}, loaded without hashing (verify=False)"):
                with pytest.raises(StructKVError, match=name.replace(".", r"\.")):
                    Engine.load(copy, verify=False)
        shutil.rmtree(copy)


EDITS = [
    ("format_version newer", {"format_version": FORMAT_VERSION + 1}, "newer than this"),
    ("format_version 0", {"format_version": 0}, "no valid format_version"),
    ("format_version a string", {"format_version": "2"}, "no valid format_version"),
    ("format_version removed", {"format_version": None}, "no valid format_version"),
    ("dtype", {"dtype": "fp16"}, "edited after export"),
    ("pivot", {"method.pivot": 1}, "edited after export"),
    ("r_kv", {"method.r_kv": 0.5}, "edited after export"),
    ("a graph's shapes", {"graphs.decode.outputs.0.shape": [1, 2]}, "edited after export"),
    ("a file's hash", {"files.weights.bin": "0" * 64}, "edited after export"),
    ("the model config", {"config.num_hidden_layers": 7}, "edited after export"),
]


def _edit(manifest: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    if keys[0] == "files":  # file names contain dots
        keys = ["files", ".".join(keys[1:])]
    node = manifest
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is None:
        del node[keys[-1]]
    elif isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


@pytest.mark.parametrize("label,edits,message", EDITS, ids=[e[0] for e in EDITS])
def test_manifest_fields_edited_are_refused(engine, tmp_path, label, edits, message):
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    for key, value in edits.items():
        _edit(manifest, key, value)
    (copy / MANIFEST).write_text(json.dumps(manifest, indent=1))
    with case(CLS, f"manifest: {label} edited"):
        with pytest.raises(StructKVError, match=message):
            Engine.load(copy)
        rc, _, err = run_cli(main, ["run", "--engine", str(copy), "--prompt", "hello world!"])
        assert_one_error(rc, err, message)


BAD_MANIFESTS = [
    ("not JSON", b'{"format_version": 2,', "is not valid JSON"),
    ("not UTF-8", b"\xff\xfe{}", "is not valid JSON"),
    ("a JSON list", b"[1, 2]", "not an engine manifest"),
    ("empty", b"", "is not valid JSON"),
]


@pytest.mark.parametrize("label,content,message", BAD_MANIFESTS, ids=[b[0] for b in BAD_MANIFESTS])
def test_a_manifest_that_is_not_one_is_refused(engine, tmp_path, label, content, message):
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    (copy / MANIFEST).write_bytes(content)
    with case(CLS, f"manifest {label}"):
        with pytest.raises(StructKVError, match=message):
            Engine.load(copy)


def test_graphs_swapped_between_engines_are_refused(engine, other, tmp_path):
    for name in ("pre_pivot.onnx", "decode.onnx", "weights.bin"):
        copy = tmp_path / f"swap-{name}"
        shutil.copytree(engine, copy)
        shutil.copy(other / name, copy / name)
        with case(CLS, f"{name} from another engine"):
            pattern = rf"{re.escape(name)} (does not match its sha256|is \d+ bytes, the manifest)"
            with pytest.raises(StructKVError, match=pattern):
                Engine.load(copy)


def test_a_tokenizer_from_another_model_is_refused(smollm2_engine, tmp_path):
    """Tokenizer files replaced by another model's (its vocabulary larger than the engine's
    embedding): refused by hash, and — re-hashed by hand, as a user "fixing" it would —
    by the vocabulary check, before a token id past the embedding could reach a graph."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from structkv.manifest import SELF_HASH, content_hash, sha256

    copy = tmp_path / "engine"
    shutil.copytree(smollm2_engine, copy)
    vocab = {f"w{i}": i for i in range(60000)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    shutil.rmtree(copy / "tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(copy / "tokenizer")
    manifest = json.loads((copy / MANIFEST).read_text())
    with case(CLS, "tokenizer from another model"):
        with pytest.raises(StructKVError, match="tokenizer"):
            Engine.load(copy)
    files = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file())
    manifest["tokenizer"] = [f for f in files if f.startswith("tokenizer/")]
    manifest["files"] = {f: sha256(copy / f) for f in files if f != MANIFEST}
    manifest["sizes"] = {f: (copy / f).stat().st_size for f in manifest["files"]}
    manifest[SELF_HASH] = content_hash(manifest)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with case(CLS, "tokenizer from another model, manifest re-hashed"):
        with pytest.raises(StructKVError, match="tokenizer has 60000 tokens; the model's "
                           "embedding has 49152"):  # fmt: skip
            Engine.load(copy)
