"""Streaming export (issue 16) from checkpoint directories with each alias family's published
config.json (scaled down): sharded safetensors with an index, rope scaling (Llama 3.1), sliding
window and head_dim (Ministral), QKV bias (Qwen2), tied and untied embeddings. The engine's
weights are compared byte for byte with the checkpoint read by the safetensors library, and
its greedy tokens with the torch reference loading the same directory."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from structkv.configs import scaled
from structkv.errors import StructKVError
from structkv.export import checkpoint as ckpt
from structkv.export.exporter import ExportSettings, export_engine
from structkv.generate import generate_ids
from structkv.methods import StructKV
from structkv.models import load
from structkv.runtime.engine import Engine

PIVOT, LAM, NEW = 1, 0.5, 8


def quiet(message: str) -> None:
    pass


FAMILIES = {
    "qwen2.5-7b": dict(),
    "qwen2.5-7b-tied": dict(tie_word_embeddings=True),
    "qwen2.5-32b": dict(),
    "llama-3.1-8b": dict(),
    "ministral-8b": dict(),
}


def write_checkpoint(directory, alias: str, layers: int = 3, width: int = 32, **overrides):
    """A random bf16 checkpoint of ``alias``'s scaled config, in at least three shards."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**scaled(alias, layers, width=width, vocab=512), **overrides}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    config = AutoConfig.from_pretrained(directory)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15 if p.dim() == 2 else 0.05).add_(1.0 if p.dim() == 1 else 0.0)
    model = model.to(torch.bfloat16)
    total = sum(p.numel() * 2 for p in model.parameters())
    model.save_pretrained(directory, max_shard_size=max(1, total // 4))
    return directory


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tmp_path_factory):
    name = request.param
    alias = name.removesuffix("-tied")
    root = tmp_path_factory.mktemp(name)
    source = write_checkpoint(root / "hf", alias, **FAMILIES[name])
    settings = ExportSettings(method=StructKV(pivot=PIVOT, lam=LAM), attention="contrib")
    with pytest.MonkeyPatch.context() as mp:
        # blocks of a few rows, as a multi-GB tensor is streamed: the transposed weights are
        # then written band by band
        mp.setattr(ckpt, "BLOCK_BYTES", 700)
        out = export_engine(str(source), root / "engine", settings, progress=False, log=quiet)
    return name, source, out


def test_checkpoints_are_sharded_as_on_the_hub(exported):
    _, source, _ = exported
    index = json.loads((source / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3


def test_weights_equal_the_checkpoint_byte_for_byte(exported):
    """Every checkpoint matrix is in weights.bin as the graphs read it (fp32, transposed where
    the graph multiplies by its transpose), read back through ONNX's external-data offsets and
    compared with the safetensors library's own reading of the shards."""
    from onnx.numpy_helper import to_array
    from safetensors.torch import load_file

    _, source, out = exported
    reference = {}
    for shard in source.glob("model-*.safetensors"):
        reference.update(load_file(shard))
    seen = set()
    for graph in out.glob("*.onnx"):
        proto = onnx.load(str(graph), load_external_data=False)
        for init in proto.graph.initializer:
            name = init.name.removesuffix(ckpt.TRANSPOSED)
            if name not in reference or reference[name].dim() != 2:
                continue
            info = {e.key: e.value for e in init.external_data}
            assert info["location"] == "weights.bin"
            onnx.external_data_helper.load_external_data_for_tensor(init, str(out))
            got = to_array(init)
            want = reference[name].float()
            want = want.t() if init.name.endswith(ckpt.TRANSPOSED) else want
            np.testing.assert_array_equal(got, want.numpy(), err_msg=init.name)
            seen.add(name)
    matrices = {n for n, t in reference.items() if t.dim() == 2}
    assert seen == matrices  # every matrix is used, and found


def test_engine_matches_torch_on_the_same_directory(exported):
    name, source, out = exported
    model = load(str(source)).model
    engine = Engine.load(out)
    method = StructKV(pivot=PIVOT, lam=LAM)
    for n, seed in ((90, 0), (140, 1)):
        ids = torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed))
        ref = method.prefill(model, ids)
        got = engine.prefill(ids.numpy())
        np.testing.assert_allclose(got.logits, ref.logits.numpy(), atol=2e-4, rtol=0)
        expected = generate_ids(model, ids, method, NEW).tokens
        assert engine.generate(ids.numpy(), NEW)[0] == expected, name


def test_manifest_keeps_the_family_config(exported):
    name, source, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    config = json.loads((source / "config.json").read_text())
    got = manifest["config"]
    for key in ("num_hidden_layers", "num_key_value_heads", "hidden_size", "vocab_size"):
        assert got[key] == config[key]
    if name.startswith("llama"):  # Llama 3.1's rope scaling reached the graphs' config
        rope = got.get("rope_parameters") or got.get("rope_scaling")
        assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    if name.startswith("ministral"):
        assert got["sliding_window"] == config["sliding_window"]
        assert (
            got["head_dim"]
            == config["head_dim"]
            != got["hidden_size"] // got["num_attention_heads"]
        )


def test_disk_full_is_refused_before_writing(tmp_path, monkeypatch):
    source = write_checkpoint(tmp_path / "hf", "qwen2.5-7b", layers=2)
    real = shutil.disk_usage

    def tiny_disk(path):
        usage = real(path)
        return usage._replace(free=1000)

    monkeypatch.setattr(ckpt.shutil, "disk_usage", tiny_disk)
    settings = ExportSettings(method=StructKV(pivot=0, lam=LAM), attention="contrib")
    with pytest.raises(StructKVError, match=r"not enough disk space.*free some space"):
        export_engine(str(source), tmp_path / "engine", settings, progress=False, log=quiet)
    assert not (tmp_path / "engine").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary directory left


def test_a_missing_or_truncated_shard_is_named(tmp_path):
    source = write_checkpoint(tmp_path / "hf", "llama-3.1-8b", layers=2)
    settings = ExportSettings(method=StructKV(pivot=0, lam=LAM), attention="contrib")
    shards = sorted(source.glob("model-*.safetensors"))
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) - 100])
    with pytest.raises(StructKVError, match=r"truncated.*re-download"):
        export_engine(str(source), tmp_path / "e1", settings, progress=False, log=quiet)
    shards[-1].unlink()
    with pytest.raises(StructKVError, match=f"{shards[-1].name}.*missing"):
        export_engine(str(source), tmp_path / "e2", settings, progress=False, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_no_profile_exports_the_paper_preset_with_a_fixed_pivot(tmp_path, monkeypatch):
    """A model without a calibration profile is not calibrated at export (it may not fit in
    memory): the paper preset, λ 0.9 and the deepest pivot at compute fraction <= 0.6."""
    from structkv.calibration import compute_fraction

    monkeypatch.setenv("STRUCTKV_CACHE", str(tmp_path / "cache"))
    source = write_checkpoint(tmp_path / "hf", "qwen2.5-7b", layers=6)
    notes = []
    out = export_engine(str(source), tmp_path / "engine", ExportSettings(attention="contrib"),
                        progress=False, log=notes.append)  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    method = manifest["method"]
    assert method["lam"] == 0.9 and isinstance(method["pivot"], int)
    assert (
        compute_fraction(method["pivot"], 6, 0.2)
        <= 0.6
        < compute_fraction(method["pivot"] + 1, 6, 0.2)
    )
    assert manifest["pivot_source"].startswith("paper preset")
    assert any("no calibration profile" in n and "--pivot" in n for n in notes)


def test_a_tied_embedding_stored_under_the_lm_head_name(tmp_path):
    """Checkpoints store a tied embedding / LM head under either name (the embedded model's
    GGUF conversion keeps `lm_head.weight`): export finds it under the one present."""
    from safetensors.torch import load_file, save_file

    source = write_checkpoint(tmp_path / "hf", "qwen2.5-7b", layers=2, tie_word_embeddings=True)
    index_path = source / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = source / index["weight_map"].pop("model.embed_tokens.weight")
    tensors = load_file(shard)
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"]["lm_head.weight"] = shard.name
    index_path.write_text(json.dumps(index))
    settings = ExportSettings(method=StructKV(pivot=0, lam=LAM), attention="contrib")
    out = export_engine(str(source), tmp_path / "engine", settings, progress=False, log=quiet)
    model = load(str(source)).model
    ids = torch.randint(0, 512, (80,), generator=torch.Generator().manual_seed(3))
    method = StructKV(pivot=0, lam=LAM)
    assert (
        Engine.load(out).generate(ids.numpy(), NEW)[0]
        == generate_ids(model, ids, method, NEW).tokens
    )


def test_an_alias_resolves_through_the_local_hf_cache(tmp_path, monkeypatch):
    """`--model qwen2.5-7b` reads the snapshot the Hugging Face cache holds (never the hub)."""
    from structkv.models import HUB_ALIASES

    repo = HUB_ALIASES["qwen2.5-7b"]
    cache = tmp_path / "hub"
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    write_checkpoint(snapshot, "qwen2.5-7b", layers=2)
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    settings = ExportSettings(method=StructKV(pivot=0, lam=LAM), attention="contrib")
    out = export_engine("qwen2.5-7b", tmp_path / "engine", settings, progress=False, log=quiet)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_id"] == "qwen2.5-7b" and manifest["config"]["num_hidden_layers"] == 2


def test_a_directory_without_safetensors_is_refused_with_the_fix(tmp_path):
    source = write_checkpoint(tmp_path / "hf", "ministral-8b", layers=2)
    for f in source.glob("model*.safetensors*"):
        f.unlink()
    (source / "pytorch_model.bin").write_bytes(b"")
    settings = ExportSettings(method=StructKV(pivot=0, lam=LAM), attention="contrib")
    with pytest.raises(StructKVError, match=r"no model.safetensors.*safe_serialization=True"):
        export_engine(str(source), tmp_path / "engine", settings, progress=False, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
