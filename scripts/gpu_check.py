#!/usr/bin/env python
"""The GPU checks of StructKV, one line each: PASS, FAIL or SKIP (with why), plus timings.

    bash scripts/gpu_check.sh            (wraps this; run as-is on a machine with a GPU)

Checks, each independent (a missing piece skips only what needs it):
  triton-kernels   the selection kernels JIT-compiled and run on the GPU: identical indices to
                   the torch path (CPU) for N = 4K, 32K, 128K (K up to 26K > TensorRT's 3840),
                   and the gathers; time per selection
  plugin-build     plugins_trt/ built with cmake against the installed TensorRT (else the
                   11.1 headers in shared/); STRUCTKV_CUBINS_HEADER=FILE uses cubins compiled
                   elsewhere (CI's Triton) instead of this machine's Triton
  plugin-enqueue   the plugin's own enqueue (created by its creator, no TensorRT library:
                   libstructkv_plugin_selftest.so) on CUDA tensors: compact with fp32 / fp16 /
                   bf16 rows at N = 4K, 32K, 128K (K > 3840) and kv_select in fp16, outputs
                   equal to the torch selection, element for element; time per call
  plugin-engine    TensorRT engines of a --target tensorrt engine's compact / kv_select graphs
                   (the StructKVCompact plugin loaded from the library): outputs equal to the
                   ONNX Runtime reference on the same inputs
  trt-engine       the whole --target tensorrt engine (fp16) on TensorRT with the paged KV cache
                   (Engine backend "tensorrt"): the same greedy tokens as ONNX Runtime (CPU,
                   fp32, the plugin's reference op), logits within 1e-2; prefill and decode
                   timings
  trt-refine       the same for a two-stage engine (the calibrated `--refine` profile in
                   docs/results/calibration/fact-4k-cap047-refine-w32: seven graphs, the
                   refine graph the plugin's kv_select mode on one row): tokens and logits as
                   trt-engine, prefill timings
  kv-resident      the paged KV pool on the GPU (CUDA provider, IOBinding; onnxruntime-gpu):
                   batched greedy tokens equal to the CPU engine, bytes per decode step
                   proportional to the batch, decode tok/s resident vs host pool
  torch-prefill    torch on cuda in bf16: prefill seconds at 4K and 32K, full vs structkv
                   (structkv.bench, medians, paired speedups) for the embedded model when
                   installed, else random weights of its shape, and random weights of
                   Llama-3.1-8B's shape (speed does not depend on the weights' values)
Exit status: 1 if any check FAILED, else 0. Nothing here downloads anything.
STRUCTKV_GPU_OUT=DIR also writes DIR/gpu_check.json (every check's status, detail and data).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS: list[tuple[str, str, str]] = []
DATA: dict[str, object] = {}  # per check: measurements for gpu_check.json


def report(name: str, status: str, detail: str = "") -> None:
    RESULTS.append((name, status, detail))
    print(f"{status:<4} {name:<15} {detail}", flush=True)


def check(name: str):
    def wrap(fn):
        def run(*args):
            start = time.perf_counter()
            try:
                detail = fn(*args)
                report(name, "PASS", f"{detail or ''} ({time.perf_counter() - start:.1f} s)")
            except Skip as s:
                report(name, "SKIP", str(s))
            except Exception as e:  # a failed check must not stop the others
                last = traceback.format_exc().strip().splitlines()[-1]
                report(name, "FAIL", f"{type(e).__name__}: {e} [{last}]"[:800])

        return run

    return wrap


class Skip(Exception):
    pass


def _cuda():
    import torch

    if not torch.cuda.is_available():
        raise Skip(f"torch {torch.__version__} sees no CUDA device")
    return torch


@check("triton-kernels")
def triton_kernels() -> str:
    torch = _cuda()
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        from structkv.kernels import select_triton as st
    except ImportError as e:
        raise Skip(f"OpenAI Triton not importable: {e}") from None
    from structkv.selection import budget, gather_tokens, select_tokens

    times = []
    for n in (4096, 32768, 131072):
        for kind in ("random", "ties"):
            g = torch.Generator().manual_seed(n)
            s = (
                torch.rand(n, generator=g)
                if kind == "random"
                else torch.randint(0, 4, (n,)).float()
            )
            k = budget(0.2, n)
            want = select_tokens(s, k, 32, 7, "max")
            got = st.select_tokens(s.cuda(), k, 32, 7, "max")
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(5):
                got = st.select_tokens(s.cuda(), k, 32, 7, "max")
            torch.cuda.synchronize()
            times.append(f"{n // 1024}K {1e3 * (time.perf_counter() - start) / 5:.2f} ms")
            if not torch.equal(got.cpu(), want):
                raise AssertionError(f"indices differ at N={n} ({kind})")
    sal = torch.rand(30, 3, 4096)
    keep = select_tokens(sal, budget(0.1, 8192), 8, 7, "avg")
    if not torch.equal(st.select_tokens(sal.cuda(), budget(0.1, 8192), 8, 7, "avg").cpu(), keep):
        raise AssertionError("per-layer / per-head selection differs")
    keys = torch.randn(30, 3, 4096, 64, dtype=torch.float16)
    if not torch.equal(st.gather_tokens(keys.cuda(), keep.cuda()).cpu(), gather_tokens(keys, keep)):
        raise AssertionError("gather differs")
    return "identical indices; " + ", ".join(times[::2])


def _plugin_library(build: Path) -> Path:
    lib = build / "plugins_trt" / "libnvinfer_plugin_structkv.so"
    if not lib.is_file():
        raise Skip("the plugin library was not built (see plugin-build)")
    return lib


@check("plugin-build")
def plugin_build(build: Path) -> str:
    if shutil.which("cmake") is None:
        raise Skip("cmake not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    defs = [f"-DPython3_EXECUTABLE={sys.executable}"]
    if os.environ.get("STRUCTKV_CUBINS_HEADER"):
        defs.append(f"-DSTRUCTKV_CUBINS_HEADER={os.environ['STRUCTKV_CUBINS_HEADER']}")
    cfg = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), *defs],
                         capture_output=True, text=True, env=env)  # fmt: skip
    if cfg.returncode != 0:
        raise AssertionError(cfg.stderr[-600:])
    built = subprocess.run(["cmake", "--build", str(build), "-j8"], capture_output=True, text=True,
                           env=env)  # fmt: skip
    if built.returncode != 0:
        raise AssertionError(built.stderr[-600:] or built.stdout[-600:])
    test = subprocess.run([str(build / "plugins_trt" / "testStructKVCompact")], capture_output=True,
                          text=True)  # fmt: skip
    if test.returncode != 0:
        raise AssertionError(test.stderr[-600:])
    headers = "real TensorRT" if "third_party" not in cfg.stdout else "TensorRT 11.1 headers"
    cubins = "prebuilt cubins" if "prebuilt" in cfg.stdout else "cubins from this Triton"
    return f"built against {headers}, {cubins}; host tests pass"


@check("plugin-enqueue")
def plugin_enqueue(build: Path) -> str:
    torch = _cuda()
    lib = build / "plugins_trt" / "libstructkv_plugin_selftest.so"
    if not lib.is_file():
        raise Skip("the selftest library was not built (see plugin-build)")
    from structkv.kernels.plugin_selftest import PluginSelftest, reference

    plugin = PluginSelftest(lib)
    times = {}

    def compare(label, mode, inputs, **attrs):
        got = plugin.run(mode, [t.cuda() for t in inputs], **attrs)
        want = reference(mode, inputs, **{"r": 0.2, "window": 8, "pooling": 7,
                                          "pool_mode": "max", **attrs})  # fmt: skip
        for i, (a, b) in enumerate(zip(got, want)):
            if a.shape != b.shape or not torch.equal(a.cpu(), b):
                raise AssertionError(f"{label}: output {i} differs from the torch selection "
                                     f"(shapes {tuple(a.shape)} vs {tuple(b.shape)})")  # fmt: skip
        cuda_inputs = [t.cuda() for t in inputs]
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            plugin.run(mode, cuda_inputs, **attrs)
        times[label] = round((time.perf_counter() - start) / 10 * 1e3, 3)

    g = torch.Generator().manual_seed(0)
    for n in (4096, 32768, 131072):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            hidden = torch.randn(1, n, 576, generator=g).to(dtype)
            compare(f"compact {n // 1024}K {str(dtype)[6:]}", "compact",
                    [hidden, torch.rand(n, generator=g)])  # fmt: skip
        ties = torch.randint(0, 4, (n,), generator=g).float()  # many equal scores
        compare(f"compact {n // 1024}K ties", "compact", [torch.randn(1, n, 64, generator=g), ties])
    n, prompt = 3000, 9000
    keys, values = (torch.randn(15, 3, n, 64, generator=g).half() for _ in range(2))
    kv = [keys, values, torch.rand(15, 3, n, generator=g),
          torch.randperm(prompt, generator=g)[:n].sort().values,
          torch.zeros(prompt, dtype=torch.int64)]  # fmt: skip
    compare("kv_select fp16 r_kv 0.1", "kv_select", kv, r=0.1)
    compare("kv_select fp16 avg pool 3", "kv_select", kv, r=0.1, pooling=3, pool_mode="avg")
    # chunk mode (span-preserving selection): chunk means summed as torch's CPU cumsum sums them
    compare("kv_select fp16 chunk 16", "kv_select", kv, r=0.1, chunk=16)
    compare("kv_select fp16 avg pool 3 chunk 32", "kv_select", kv, r=0.5, pooling=3,
            pool_mode="avg", chunk=32)  # fmt: skip
    for n in (4096, 131072):
        scores = [torch.randn(1, n, 64, generator=g), torch.rand(n, generator=g)]
        compare(f"compact {n // 1024}K chunk 16", "compact", scores, chunk=16)
    DATA["plugin-enqueue"] = {"ms_per_call": times}
    return f"{len(times)} cases equal to the torch selection; ms/call: " + ", ".join(
        f"{k} {v}" for k, v in times.items() if "ties" not in k
    )


def _trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise Skip("the tensorrt Python package is not installed") from None
    return trt


def _build_and_run(trt, onnx_path: Path, feeds: dict, plugin: Path | None, fp16: bool):
    """Build a TensorRT engine for one graph (its shapes fixed to the feeds) and run it."""
    import numpy as np
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    if plugin is not None:
        trt.get_plugin_registry().load_library(str(plugin))
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise AssertionError(f"{onnx_path.name}: " + str(parser.get_error(0)))
    config = builder.create_builder_config()
    if fp16 and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = feeds[t.name].shape
        profile.set_shape(t.name, shape, shape, shape)
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise AssertionError(f"{onnx_path.name}: TensorRT build failed")
    engine = trt.Runtime(logger).deserialize_cuda_engine(blob)
    context = engine.create_execution_context()
    buffers = {}
    for name, value in feeds.items():
        buffers[name] = torch.from_numpy(np.ascontiguousarray(value)).cuda()
        context.set_input_shape(name, value.shape)
        context.set_tensor_address(name, buffers[name].data_ptr())
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            shape = tuple(context.get_tensor_shape(name))
            dtypes = {trt.float32: torch.float32, trt.float16: torch.float16,
                      trt.int64: torch.int64, trt.bfloat16: torch.bfloat16}  # fmt: skip
            dtype = dtypes[engine.get_tensor_dtype(name)]
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise AssertionError(f"{onnx_path.name}: execution failed")
    stream.synchronize()
    return {k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
            for k, v in outputs.items()}  # fmt: skip


def _export(out: Path, *extra: str) -> Path:
    if not out.exists():
        from structkv.export.exporter import main as export

        if export(["--model", "smollm2-135m", "--out", str(out), *extra]) != 0:
            raise AssertionError(f"structkv-export {' '.join(extra)} failed")
    return out


@check("plugin-engine")
def plugin_engine(build: Path, work: Path) -> str:
    import numpy as np
    import onnxruntime as ort

    _cuda()
    trt = _trt()
    lib = _plugin_library(build)
    from structkv.kernels import plugin_reference

    engine = _export(work / "smollm2-trt", "--target", "tensorrt")
    rng = np.random.default_rng(0)
    cases = []
    for n in (4096, 32768):
        cases.append(("compact", {"hidden": rng.standard_normal((1, n, 576), dtype=np.float32),
                                  "centrality": rng.random(n, dtype=np.float32)}))  # fmt: skip
    n, big = 3000, 9000
    cases.append(("kv_select", {
        "keys": rng.standard_normal((15, 3, n, 64), dtype=np.float32),
        "values": rng.standard_normal((15, 3, n, 64), dtype=np.float32),
        "saliency": rng.random((15, 3, n), dtype=np.float32),
        "positions": np.sort(rng.choice(big, n, replace=False)).astype(np.int64),
        "prompt_len": np.zeros(big, dtype=np.int64)}))  # fmt: skip
    for name, feeds in cases:
        path = engine / f"{name}.onnx"
        ref = plugin_reference.session(path, ort.SessionOptions(), ["CPUExecutionProvider"])
        want = dict(zip([o.name for o in ref.get_outputs()], ref.run(None, feeds)))
        got = _build_and_run(trt, path, feeds, lib, fp16=False)
        for key, value in want.items():
            if not np.array_equal(got[key], value):
                raise AssertionError(f"{name} output {key} differs from the reference")
    return "compact (4K, 32K) and kv_select equal to the reference"


@check("trt-engine")
def trt_engine(build: Path, work: Path) -> str:
    """The whole engine on TensorRT (the five graphs built with the plugin, the paged KV cache)
    against ONNX Runtime (CPU, fp32, the plugin's reference op): same greedy tokens, logits
    within 1e-2 (relative to their range) in fp16; then prefill / decode timings."""
    return _trt_whole_engine(build, work, "smollm2-trt")


REFINE_PROFILE = (
    ROOT / "docs/results/calibration/fact-4k-cap047-refine-w32/smollm2-135m-profile.json"
)


@check("trt-refine")
def trt_refine(build: Path, work: Path) -> str:
    """trt-engine for a two-stage engine (post_pivot -> refine -> post_refine)."""
    return _trt_whole_engine(build, work, "smollm2-refine-trt", "--profile", str(REFINE_PROFILE))


def _trt_whole_engine(build: Path, work: Path, name: str, *extra: str) -> str:
    _cuda()
    _trt()
    import numpy as np

    from structkv.runtime.engine import Engine

    os.environ.setdefault("STRUCTKV_TRT_PLUGIN", str(_plugin_library(build)))
    fp16 = _export(work / f"{name}-fp16", "--target", "tensorrt", "--dtype", "fp16", *extra)
    ref = Engine.load(_export(work / name, "--target", "tensorrt", *extra), kv_cache_mb=256)
    start = time.perf_counter()
    engine = Engine.load(fp16, backend="tensorrt", kv_cache_mb=256)
    built = time.perf_counter() - start
    ids = np.random.default_rng(1).integers(0, 49152, 2048)
    want, _ = ref.generate(ids, 16)
    got, stats = engine.generate(ids, 16)
    if got != want:
        raise AssertionError(f"tokens differ: TensorRT {got[:8]}... vs ONNX Runtime {want[:8]}...")
    a, b = ref.prefill(ids).logits, engine.prefill(ids).logits.astype(np.float32)
    err = float(np.abs(a - b).max()) / max(1.0, float(np.abs(a).max()))
    if err > 1e-2:
        raise AssertionError(f"prefill logits differ by {err:.3g} (relative)")
    times = []
    for n in (1024, 4096):
        x = np.random.default_rng(n).integers(0, 49152, n)
        engine.prefill(x)
        start = time.perf_counter()
        for _ in range(3):
            engine.prefill(x)
        times.append(f"prefill {n // 1024}K {(time.perf_counter() - start) / 3 * 1e3:.1f} ms")
    return (
        f"16 tokens equal, logits rel err {err:.2g}; engines built in {built:.0f} s; "
        + ", ".join(times)
        + f"; decode {stats['decode_tokens_per_s']:.0f} tok/s (host KV pool)"
    )


@check("kv-resident")
def kv_resident(work: Path) -> str:
    """The paged KV pool on the GPU (ONNX Runtime's CUDA provider, IOBinding): greedy tokens of
    a batch of 4 equal to the CPU engine with the host pool, host<->device bytes per decode step
    proportional to the batch (counted by the pool), decode tokens/s against the host pool on
    the same CUDA sessions (whole pool copied per step)."""
    torch = _cuda()
    import numpy as np
    import onnxruntime as ort

    from structkv.runtime.batch import Batch
    from structkv.runtime.engine import Engine

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (onnxruntime-gpu)")
    path = _export(work / "smollm2-contrib", "--attention", "contrib")
    cpu = Engine.load(path, providers=["CPUExecutionProvider"], kv_device=None, kv_cache_mb=256)
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    resident = Engine.load(path, providers=gpu, kv_device="cuda:0", kv_cache_mb=256)
    hosted = Engine.load(path, providers=gpu, kv_device=None, kv_cache_mb=256)
    if not isinstance(resident.cache.keys, torch.Tensor) or not resident.cache.keys.is_cuda:
        raise AssertionError("kv_device cuda:0 did not put the pool on the GPU")
    prompts = [np.random.default_rng(i).integers(0, 49152, 1024 + 256 * i) for i in range(4)]
    want = cpu.generate_batch(prompts, 16)
    got = resident.generate_batch(prompts, 16)
    if got != want:
        raise AssertionError(f"tokens differ from the CPU engine: {got[0][:6]} vs {want[0][:6]}")
    rates, per_step = {}, {}
    for label, engine in (("resident", resident), ("host", hosted)):
        batch = Batch(engine)
        for p in prompts:
            batch.add(p, 66)
        batch.step()
        before, start = engine.cache.transfers.total, time.perf_counter()
        for _ in range(64):
            batch.step()
        rates[label] = 64 * len(prompts) / (time.perf_counter() - start)
        per_step[label] = (engine.cache.transfers.total - before) / 64
    bound = len(prompts) * (4 * 49152 + 8 * 200)
    if not 0 < per_step["resident"] <= bound:
        raise AssertionError(f"{per_step['resident']:.0f} bytes per step > bound {bound}")
    pool_mb = resident.cache.keys.numel() * resident.cache.keys.element_size() * 2 / 2**20
    DATA["kv-resident"] = {"tokens_per_s": rates, "bytes_per_step": per_step["resident"],
                           "pool_mib": pool_mb, "batch": len(prompts)}  # fmt: skip
    return (f"batch 4: tokens equal to CPU; {per_step['resident'] / 1024:.0f} KiB per step with "
            f"a {pool_mb:.0f} MiB pool; decode {rates['resident']:.0f} tok/s resident vs "
            f"{rates['host']:.0f} tok/s host pool")  # fmt: skip


#: Random-weight stand-ins of real shapes (prefill speed does not depend on weight values).
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=False, rope_theta=500000.0),
}  # fmt: skip


def _random_model(name: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from structkv.models import LoadedModel

    spec = dict(SHAPES[name])
    theta = spec.pop("rope_theta")
    config = AutoConfig.for_model("llama", max_position_embeddings=131072,
                                  rope_parameters={"rope_type": "default", "rope_theta": theta},
                                  **spec)  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    return LoadedModel(model, None, f"random-{name}")


@check("torch-prefill")
def torch_prefill() -> str:
    torch = _cuda()
    from structkv.bench import bench_prefill

    out, rows_all = [], {}
    for name in SHAPES:
        lm = None
        if name == "smollm2-135m":
            try:
                from structkv.models import load

                lm = load(name, dtype=torch.bfloat16, device="cuda")
            except Exception as e:  # the embedded package is absent: its shape, random weights
                print(f"# {name}: {e}; random weights of its shape", flush=True)
        lm = lm or _random_model(name)
        rows = bench_prefill(lm, [4096, 32768], ["full", "structkv"], repeats=3, warmup=1)
        rows_all[lm.model_id] = rows
        full = {r["length"]: r["median_s"] for r in rows if r["method"] == "full"}
        for r in rows:
            if r["method"] != "full":
                out.append(f"{lm.model_id} {r['length'] // 1024}K: full {full[r['length']]} s,"
                           f" structkv {r['median_s']} s ({r['speedup_vs_full']}x, compute "
                           f"fraction {r['compute_fraction']})")  # fmt: skip
        del lm
        torch.cuda.empty_cache()
    DATA["torch-prefill"] = rows_all
    return "; ".join(out)


def main() -> int:
    work = Path(os.environ.get("STRUCTKV_GPU_WORK", tempfile.mkdtemp(prefix="structkv-gpu-")))
    build = work / "build"
    print(f"# structkv GPU check, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, work dir {work}")
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True)  # fmt: skip
        print(f"# {smi.stdout.strip()}")
    triton_kernels()
    plugin_build(build)
    plugin_enqueue(build)
    plugin_engine(build, work)
    trt_engine(build, work)
    trt_refine(build, work)
    kv_resident(work)
    torch_prefill()
    failed = [r for r in RESULTS if r[1] == "FAIL"]
    if os.environ.get("STRUCTKV_GPU_OUT"):
        import torch

        doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "checks": [{"name": n, "status": st, "detail": d} for n, st, d in RESULTS],
               "data": DATA}  # fmt: skip
        path = Path(os.environ["STRUCTKV_GPU_OUT"]) / "gpu_check.json"
        path.write_text(json.dumps(doc, indent=1))
    print(f"# {len(RESULTS) - len(failed)} of {len(RESULTS)} not failed "
          f"({sum(r[1] == 'SKIP' for r in RESULTS)} skipped)")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
