"""structkv-export + runtime on tiny random models: parity with the reference, polygraphy per
graph, the paged cache under batched decoding, and the engine's refusals."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import exported_engine

from structkv.errors import StructKVError
from structkv.export.exporter import ExportSettings, export_engine
from structkv.export.weights import ALIGN, INLINE_BYTES
from structkv.generate import generate_ids
from structkv.kernels import ort_ops
from structkv.manifest import FORMAT_VERSION, MANIFEST, content_hash
from structkv.methods import StructKV
from structkv.models import tiny_model
from structkv.runtime.batch import Batch
from structkv.runtime.engine import Engine
from structkv.runtime.stages import GRAPHS

PIVOT, LAM, NEW = 2, 0.5, 10
SMALL = "tiny-llama-L4-s0"  # 4 layers (pivot 2 leaves one after it): a cheaper export
# One engine per family, exported once per module and shared by every engine test: the
# default attention (auto: StructKV's CPU kernel where a compiler can build it) on Qwen2 and
# Mistral, ONNX Runtime's GroupQueryAttention (the portable kernel) on Llama.
ENGINES = [("tiny-llama", "contrib"), ("tiny-qwen2", "auto"), ("tiny-mistral", "auto")]


@pytest.fixture(scope="module", params=ENGINES, ids=[f"{f}-{a}" for f, a in ENGINES])
def engine_dir(request, tmp_path_factory):
    family, attention = request.param
    return family, exported_engine(family, attention, tmp_path_factory)


def _prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def test_engine_matches_the_reference_method(engine_dir):
    """ONNX Runtime engine == torch stage backend == `StructKV` reference (greedy tokens, kept
    positions per layer and head, first-step logits)."""
    family, out = engine_dir
    ort_engine = Engine.load(out)
    torch_engine = Engine.load(out, backend="torch")
    model = tiny_model(family).model
    for n, seed in ((100, 0), (173, 1), (251, 2)):
        ids = _prompt(n, seed)
        ref = StructKV(pivot=PIVOT, lam=LAM).prefill(model, ids)
        got = ort_engine.prefill(ids.numpy())
        oracle = torch_engine.prefill(ids.numpy())
        np.testing.assert_allclose(got.logits, ref.logits.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(oracle.logits, ref.logits.numpy(), atol=1e-5, rtol=0)
        assert got.stats["propagated_tokens"] == ref.stats.propagated_tokens
        for layer, lc in enumerate(ref.cache.layers):
            assert np.array_equal(got.positions[layer], lc.kept_positions().numpy()), layer
        expected = generate_ids(model, ids, StructKV(pivot=PIVOT, lam=LAM), NEW).tokens
        assert ort_engine.generate(ids.numpy(), NEW)[0] == expected
        assert torch_engine.generate(ids.numpy(), NEW)[0] == expected


def test_chunked_engine_matches_the_reference_method(chunk_engine):
    """--chunk in the exported graphs: the engine keeps the same whole chunks as the torch
    method (propagated positions and every layer's kept positions), the same logits and
    greedy tokens, down to the shortest prompt it takes (window + one chunk), and the scheduler's
    per-layer count (selected_count) is what it keeps."""
    from structkv.runtime.backends import EngineBackend

    engine = Engine.load(chunk_engine)
    assert engine.method.chunk == 16
    model = tiny_model("tiny-llama", num_layers=4, seed=0).model  # SMALL
    method = StructKV(pivot=PIVOT, lam=LAM, chunk=16)
    for n, seed in ((24, 3), (39, 4), (100, 0), (173, 1), (411, 2)):
        ids = _prompt(n, seed)
        ref = method.prefill(model, ids)
        got = engine.prefill(ids.numpy())
        np.testing.assert_allclose(got.logits, ref.logits.numpy(), atol=1e-4, rtol=0)
        assert got.stats["propagated_tokens"] == ref.stats.propagated_tokens
        for layer, lc in enumerate(ref.cache.layers):
            assert np.array_equal(got.positions[layer], lc.kept_positions().numpy()), (n, layer)
        assert EngineBackend(engine, "t").kv_tokens(n) == got.positions[0].shape[-1]
        assert engine.generate(ids.numpy(), NEW)[0] == generate_ids(model, ids, method, NEW).tokens
    if n > 200:  # spans: some kept run of 16 consecutive positions outside the window
        head = got.positions[0][0].tolist()
        assert any(head[i : i + 16] == list(range(head[i], head[i] + 16)) for i in range(len(head)))
    short = engine.prefill(_prompt(23, 5).numpy())  # one under window + chunk: kept whole
    assert not short.stats["compressed"] and short.positions.shape[-1] == 23


def test_short_prompts_are_prefilled_whole_and_match_full_context(engine_dir):
    """A prompt under window + 2 tokens (what the prefill graphs take) is prefilled uncompressed
    through the decode graph: its logits are the model's own full-context logits (plain HF
    forward), every layer keeps every position, generation equals full-context generation, and
    the scratch blocks it borrowed are back in the pool (also when the pool is too small)."""
    from structkv.methods import Full
    from structkv.runtime.backends import EngineBackend

    family, out = engine_dir
    engine = Engine.load(out, kv_cache_mb=4)
    model = tiny_model(family).model
    least = engine.method.window + 2
    for n in (1, 2, engine.method.window, least - 1):
        ids = _prompt(n, 40 + n)
        got = engine.prefill(ids.numpy())
        with torch.no_grad():
            want = model(ids[None]).logits[0, -1]
        np.testing.assert_allclose(got.logits, want.numpy(), atol=1e-4, rtol=0)
        assert not got.stats["compressed"] and got.stats["compute_fraction"] == 1.0
        assert got.positions.shape == (*got.positions.shape[:2], n)
        assert (got.positions == np.arange(n)).all()
        assert EngineBackend(engine, "t").kv_tokens(n) == n
        assert engine.cache.blocks_free == engine.cache.num_blocks
        assert engine.generate(ids.numpy(), NEW)[0] == generate_ids(model, ids, Full(), NEW).tokens
    assert engine.prefill(_prompt(least, 1).numpy()).stats["compressed"]
    cache = engine.cache
    cache.admit(99, cache.num_blocks * cache.block_size)  # a full pool: no room to borrow
    with pytest.raises(StructKVError, match="KV blocks"):
        engine.prefill(_prompt(least - 1, 2).numpy())
    assert cache.sequences() == [99] and cache.blocks_free == 0
    cache.release(99)
    with pytest.raises(StructKVError, match="the prompt is empty"):
        engine.check_prompt(0, 4)


def test_batched_decode_equals_decoding_alone_and_frees_the_pool(engine_dir):
    _, out = engine_dir
    engine = Engine.load(out, kv_cache_mb=4)
    prompts = [_prompt(n, n).numpy() for n in (90, 140, 233)]
    batch = engine.generate_batch(prompts, NEW)
    assert batch == [engine.generate_batch([p], NEW)[0] for p in prompts]
    assert engine.cache.blocks_free == engine.cache.num_blocks


def test_compressed_prompt_blocks_meet_the_bound(engine_dir):
    _, out = engine_dir
    engine = Engine.load(out, kv_cache_mb=4)
    n, new, w, block = 1000, 8, 8, engine.cache.block_size
    batch = Batch(engine)
    seq, _ = batch.add(_prompt(n, 5).numpy(), new)
    for _ in range(new - 1):
        batch.step()
    used = engine.cache.blocks_used
    batch.finish(seq)
    assert used <= math.ceil((0.1 * n + w + new) / block)
    assert used < math.ceil(n / block) / 5  # and far below what the full prompt would take


def test_graphs_pass_the_full_checker_and_weights_are_stored_once(engine_dir):
    family, out = engine_dir
    for name in GRAPHS:
        onnx.checker.check_model(str(out / f"{name}.onnx"), full_check=True)
    sizes = [p.numel() * p.element_size() for p in tiny_model(family).model.parameters()]
    big = [s for s in sizes if s > INLINE_BYTES]  # norms' few hundred bytes stay inline
    size = (out / "weights.bin").stat().st_size
    assert sum(big) <= size <= sum(big) + ALIGN * len(big)  # each weight once (+ alignment)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["method"]["pivot"] == PIVOT and manifest["method"]["lam"] == LAM
    assert set(manifest["graphs"]) == set(GRAPHS)
    attention = manifest["attention"]
    assert attention == (
        "structkv" if out.name.endswith("auto") and ort_ops.available() else "contrib"
    )
    ops = [
        (n.domain, n.op_type)
        for name in ("pre_pivot", "post_pivot")
        for n in onnx.load(out / f"{name}.onnx", load_external_data=False).graph.node
    ]
    kernel = {
        "contrib": ("com.microsoft", "GroupQueryAttention"),
        "structkv": ("structkv", "CausalAttention"),
    }
    fused = ops.count(kernel[attention])
    standard = ops.count(("", "Attention"))
    if family == "tiny-mistral":  # sliding-window layers keep the masked standard operator
        assert (fused, standard) == (0, 6)
    else:
        assert (fused, standard) == (6, 0)


class _CausalGQA(torch.nn.Module):
    def forward(self, q, k, v):
        from structkv.layers import repeat_kv

        o = torch.nn.functional.scaled_dot_product_attention(
            q, repeat_kv(k, 3), repeat_kv(v, 3), is_causal=True, scale=0.3
        )
        return o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1) * 2


@pytest.mark.parametrize("attention", ["structkv", "contrib", "onnx"])
def test_causal_attention_fusion_matches_torch(attention):
    """The fused rewrites (and the standard operator they replace) against torch SDPA on a
    length the graph was not traced with; the rewrites read the 2 KV heads directly."""
    import onnxruntime as ort

    from structkv.export.exporter import _export

    def qkv(n):
        return torch.randn(1, 6, n, 8), torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)

    n = torch.export.Dim("n", min=2)
    dyn = {"q": {2: n}, "k": {2: n}, "v": {2: n}}
    model = _export(_CausalGQA(), qkv(20), dyn, (["q", "k", "v"], ["o"]), attention)
    ops = [(node.domain, node.op_type) for node in model.graph]
    if attention == "contrib":
        assert ("com.microsoft", "GroupQueryAttention") in ops and ("", "Attention") not in ops
        gqa = next(node for node in model.graph if node.op_type == "GroupQueryAttention")
        assert gqa.attributes["kv_num_heads"].as_int() == 2  # reads K/V before repeat_kv
        assert sum(op == "Unsqueeze" for _, op in ops) == 0  # the expansion was dropped
    elif attention == "structkv":
        assert ("structkv", "CausalAttention") in ops and ("", "Attention") not in ops
        fused = next(node for node in model.graph if node.op_type == "CausalAttention")
        assert fused.inputs[1].shape[1] == 2  # K before repeat_kv
        assert sum(op == "Unsqueeze" for _, op in ops) == 0
    else:
        assert ("", "Attention") in ops and all(d != "com.microsoft" for d, _ in ops)
    import onnx_ir

    opts = ort.SessionOptions()
    if attention == "structkv":
        ort_ops.register(opts)
    sess = ort.InferenceSession(
        onnx_ir.serde.serialize_model(model).SerializeToString(),
        opts,
        providers=["CPUExecutionProvider"],
    )
    for length in (2, 37):
        q, k, v = qkv(length)
        (got,) = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})
        np.testing.assert_allclose(got, _CausalGQA()(q, k, v).numpy(), atol=2e-5)


def _structure(model) -> bytes:
    """A traced graph as bytes, without the per-node metadata (it names function addresses)."""
    import onnx_ir

    proto = onnx_ir.serde.serialize_model(model)
    for node in proto.graph.node:
        del node.metadata_props[:]
    return proto.SerializeToString()


def test_skipped_rewrites_leave_the_optimized_graphs_unchanged():
    """The optimizer rules the export leaves out for speed (:data:`SKIPPED_REWRITES`) never fire
    on our graphs: each stage graph, translated once and optimized with and without them, is the
    same graph (on SmolLM2's five graphs too, by hand: docs/TESTING.md)."""
    import warnings

    import onnx_ir

    from structkv.export import exporter

    assert exporter.SKIPPED_REWRITES  # a rule that is skipped, or this test tests nothing
    method = StructKV(pivot=2, lam=0.5)
    model = tiny_model("tiny-llama", num_layers=4, seed=1).model
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, module, args, dyn, ins, outs in exporter.build_graphs(
            model, method, torch.float32
        ):
            exported = torch.export.export(
                module, args, dynamic_shapes=dyn, strict=False,
                prefer_deferred_runtime_asserts_over_guards=True,
            )  # fmt: skip
            program = torch.onnx.export(
                exported, dynamo=True, opset_version=exporter.OPSET, input_names=ins,
                output_names=outs, optimize=False,
            )  # fmt: skip
            raw = onnx_ir.serde.serialize_model(program.model)  # the same start for both
            program.model = onnx_ir.serde.deserialize_model(raw)
            program.optimize()
            full = _structure(program.model)
            program.model = onnx_ir.serde.deserialize_model(raw)
            with exporter._without_slices_split():
                program.optimize()
            assert _structure(program.model) == full, name


def test_polygraphy_onnxrt_matches_torch_per_graph(engine_dir, tmp_path):
    """`polygraphy run --onnxrt` on each graph against the torch stage module's outputs (through
    polygraphy's API for graphs with StructKV's attention operator)."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json

    _, out = engine_dir
    attention = json.loads((out / MANIFEST).read_text())["attention"]
    oracle = Engine.load(out, backend="torch")
    ids = _prompt(120, 9).numpy()
    feeds = {"pre_pivot": {"input_ids": ids[None]}}
    pre = oracle.stages.run("pre_pivot", **feeds["pre_pivot"])
    feeds["compact"] = {"hidden": pre[0], "centrality": pre[4]}
    hidden_c, positions_c = oracle.stages.run("compact", **feeds["compact"])
    feeds["post_pivot"] = {"hidden": hidden_c, "positions": positions_c}
    feeds["kv_select"] = {
        "keys": pre[1],
        "values": pre[2],
        "saliency": pre[3],
        "positions": np.arange(120, dtype=np.int64),
        "prompt_len": np.zeros(120, dtype=np.int64),
    }
    engine = Engine.load(out, backend="torch", kv_cache_mb=1)
    batch = Batch(engine)
    seq, _ = batch.add(ids, 4)
    tables, lengths = engine.cache.batch_tables([seq])
    feeds["decode"] = {
        "input_ids": np.array([7]),
        "positions": np.array([120]),
        "block_tables": tables,
        "context_lens": lengths,
        "k_pool": engine.cache.keys,
        "v_pool": engine.cache.values,
        "pos_pool": engine.cache.positions,
    }
    for name in GRAPHS:
        outputs = oracle.stages.run(name, **feeds[name])
        names = [
            o["name"] for o in json.loads((out / MANIFEST).read_text())["graphs"][name]["outputs"]
        ]
        reference = RunResults(
            [("torch", [IterationResult(dict(zip(names, outputs)), runner_name="torch")])]
        )
        if attention == "structkv":
            # polygraphy's CLI cannot load an ONNX Runtime custom-op library: the same
            # comparison through its Python API, with the library registered on the session.
            import onnxruntime as ort
            from polygraphy.backend.onnxrt import OnnxrtRunner
            from polygraphy.comparator import Comparator, CompareFunc

            opts = ort.SessionOptions()
            ort_ops.register(opts)
            sess = ort.InferenceSession(str(out / f"{name}.onnx"), opts)
            results = Comparator.run([OnnxrtRunner(sess)], data_loader=[feeds[name]])
            results.extend(reference)
            check = CompareFunc.simple(atol=1e-4, rtol=1e-4)
            assert bool(Comparator.compare_accuracy(results, compare_func=check)), name
            continue
        save_json([feeds[name]], tmp_path / f"{name}-in.json")
        reference.save(str(tmp_path / f"{name}-ref.json"))
        proc = subprocess.run(
            [
                str(Path(sys.executable).parent / "polygraphy"),  # the CLI, as users run it
                "run",
                str(out / f"{name}.onnx"),
                "--onnxrt",
                "--load-inputs",
                str(tmp_path / f"{name}-in.json"),
                "--load-outputs",
                str(tmp_path / f"{name}-ref.json"),
                "--atol",
                "1e-4",
                "--rtol",
                "1e-4",
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, f"{name}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"


def test_engine_refuses_tampered_missing_and_newer(engine_dir, tmp_path):
    _, out = engine_dir
    copy = tmp_path / "engine"
    shutil.copytree(out, copy)
    with open(copy / "weights.bin", "r+b") as f:  # flip one byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(StructKVError, match=r"weights\.bin does not match its sha256"):
        Engine.load(copy)
    shutil.rmtree(copy)
    shutil.copytree(out, copy)
    (copy / "decode.onnx").unlink()
    with pytest.raises(StructKVError, match=r"decode\.onnx is missing"):
        Engine.load(copy)
    shutil.rmtree(copy)
    shutil.copytree(out, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StructKVError, match="newer than this structkv reads"):
        Engine.load(copy)
    manifest["format_version"], manifest["dtype"] = FORMAT_VERSION, "bf16"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StructKVError, match="was edited after export"):
        Engine.load(copy)
    manifest["manifest_sha256"] = content_hash(manifest)  # as a bf16 export writes it
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StructKVError, match=r"no bf16 kernel for MatMul.* --dtype fp32"):
        Engine.load(copy)
    with pytest.raises(StructKVError, match="not a StructKV engine"):
        Engine.load(tmp_path)
    engine = Engine.load(out)
    assert len(engine.generate(np.arange(5), 4)[0]) == 4  # under the window: kept whole
    with pytest.raises(StructKVError, match="exceeds the engine's maximum"):
        engine.generate(np.zeros(4090, dtype=np.int64), 10)


def test_export_cli_refusals_leave_nothing(tmp_path, capsys):
    from structkv.export.exporter import main

    out = tmp_path / "engine"
    assert main(["--model", "tiny-llama", "--out", str(out), "--dtype", "int8"]) == 2
    assert "unsupported --dtype 'int8'" in capsys.readouterr().err
    assert main(["--model", "no-such-model", "--out", str(out)]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["--model", "tiny-llama", "--out", str(out), "--pivot", "5"]) == 2
    assert "--pivot must be in [0, 4]" in capsys.readouterr().err
    assert main(["--model", "tiny-llama", "--out", str(out), "--r-kv", "0.5"]) == 2
    assert "must not exceed --r-struct" in capsys.readouterr().err
    argv = ["--model", "tiny-llama", "--out", str(out), "--attention", "structkv", "--dtype"]
    assert main([*argv, "fp16"]) == 2
    assert "--attention structkv is an fp32 CPU kernel" in capsys.readouterr().err
    assert main(["--model", "tiny-llama", "--out", str(out), "--attention", "flash"]) == 2
    assert "unsupported --attention 'flash'" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # an unwritable parent (even root cannot create files in /proc), a file as the parent
    assert main(["--model", "tiny-llama", "--out", "/proc/structkv-engine", "--pivot", "2"]) == 2
    assert "cannot write the engine next to --out" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert main(["--model", "tiny-llama", "--out", str(tmp_path / "a-file" / "e"), "--pivot",
                 "2"]) == 2  # fmt: skip
    assert "choose a writable directory" in capsys.readouterr().err
    assert main(["--model", "tiny-llama", "--out", str(out), "--profile", "/no/such.json"]) == 2
    assert "--profile /no/such.json: cannot read it" in capsys.readouterr().err
    (tmp_path / "a-file").unlink()
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["--model", "tiny-llama", "--out", str(out), "--pivot", "2"]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"


@pytest.mark.real_model
def test_smollm2_engine_end_to_end(smollm2, smollm2_engine, tmp_path, capsys):
    """The product path on the embedded model: structkv-export, then `structkv run --json`
    answers a needle prompt like `structkv generate` does, from an engine within 1.15x of the
    fp32 weights."""
    from structkv.cli import main as structkv
    from structkv.prompts.needle import make_needle_prompt

    out = smollm2_engine  # exported by `structkv-export --model smollm2-135m --out DIR`
    weights = sum(p.numel() * 4 for p in smollm2.model.parameters())  # tied params once
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert size <= 1.15 * weights
    # `make demo`'s prompt (2K noise haystack, seed 0), which the reference answers correctly.
    needle = make_needle_prompt(smollm2.tokenizer, 2048, 0.5, seed=0, haystack="noise")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(needle.prompt)
    capsys.readouterr()
    args = ["--chat", "--prompt-file", str(prompt), "--max-new-tokens", "24", "--json"]
    assert structkv(["run", "--engine", str(out), *args]) == 0
    ran = json.loads(capsys.readouterr().out)
    # the engine bakes in the profile's knobs, chunk and window included, as generate uses them
    assert structkv(["generate", "--model", "smollm2-135m", "--method", "structkv",
                     *args]) == 0  # fmt: skip
    generated = json.loads(capsys.readouterr().out)
    assert ran["text"] == generated["text"]
    assert needle.answer in ran["text"]
    for key in ("prompt_tokens", "pivot_layer", "propagated_tokens", "kv_tokens_per_layer"):
        assert ran["stats"][key] == generated["stats"][key], key


def test_full_context_engine_equals_the_full_model_and_benches(tmp_path, capsys):
    """R_struct = R_KV = 1 (the baseline engine of the speed comparisons) keeps every token:
    its tokens are the unmodified model's; `structkv bench --engine A --engine B` compares."""
    from structkv.cli import main
    from structkv.methods import Full

    full_dir = tmp_path / "full"
    settings = ExportSettings(StructKV(pivot=PIVOT, r_struct=1.0, r_kv=1.0))
    export_engine(SMALL, full_dir, settings, log=lambda m: None)
    engine = Engine.load(full_dir)
    ids = _prompt(150, 4)
    expected = generate_ids(tiny_model("tiny-llama", 4).model, ids, Full(), NEW).tokens
    tokens, stats = engine.generate(ids.numpy(), NEW)
    assert tokens == expected and stats["kv_tokens_per_layer"] == [150] * 4
    capsys.readouterr()
    args = ["--engine", str(full_dir), "--engine", str(full_dir), "--repeats", "1", "--json"]
    assert main(["bench", "prefill", "--lengths", "120", *args]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["length"] for r in rows] == [120, 120] and rows[1]["speedup_vs_last"] == 1.0
    assert main(["bench", "decode", "--length", "120", "--steps", "3", *args]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["kv_blocks"] == math.ceil((120 + 3) / 16)


def test_fp16_engine_matches_its_torch_oracle(tmp_path):
    """--dtype fp16: weights stored at half the bytes, and ONNX Runtime's fp16 graphs agree with
    the fp16 torch stages: logits to fp16 precision, greedy tokens equal, kept sets nearly equal
    (fp16 saliency has ~3 significant digits, so near-ties may rank differently per backend)."""
    out = tmp_path / "fp16"
    settings = ExportSettings(StructKV(pivot=PIVOT, lam=LAM), dtype="fp16")
    export_engine("tiny-llama", out, settings, log=lambda m: None)
    params = tiny_model("tiny-llama").model.parameters()
    big = [p.numel() * 2 for p in params if p.numel() * 2 > INLINE_BYTES]
    assert sum(big) <= (out / "weights.bin").stat().st_size <= sum(big) + ALIGN * len(big)
    engine, oracle = Engine.load(out), Engine.load(out, backend="torch")
    ids = _prompt(300, seed=5).numpy()
    a, b = engine.prefill(ids), oracle.prefill(ids)
    assert a.keys.dtype == np.float16 and b.keys.dtype == np.float16
    layers, heads, _ = a.positions.shape
    overlap = [
        len(set(a.positions[i, j]) & set(b.positions[i, j])) / a.positions.shape[2]
        for i in range(layers)
        for j in range(heads)
    ]
    assert np.mean(overlap) >= 0.95 and min(overlap) >= 0.8
    np.testing.assert_array_equal(a.positions[: PIVOT + 1], b.positions[: PIVOT + 1])
    np.testing.assert_allclose(a.logits, b.logits, atol=0.05)
    assert engine.generate(ids, NEW)[0] == oracle.generate(ids, NEW)[0]
