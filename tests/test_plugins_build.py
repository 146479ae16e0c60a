"""The TensorRT plugin (plugins_trt/): its kernels compile to sm_80 / sm_90 cubins without a
GPU, the library builds against TensorRT's headers (a real install, else the 11.1 public
headers beside the checkout), exports the dynamic-loading entry points and links neither
libnvinfer nor libcuda, and its host side (shape arithmetic, attributes, serialisation,
formats) passes its unit test. Running it needs TensorRT and a GPU: scripts/gpu_check.sh."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from structkv.selection import budget

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton", reason="OpenAI Triton not installed (pip install triton)")


def _clean_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compiling needs the real compiler, not the interpreter
    return env


def test_kernels_compile_to_cubins_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "cubins.h"
    proc = subprocess.run(
        [sys.executable, "-m", "structkv.kernels.aot", "--out", str(out), "--arch", "80", "90"],
        capture_output=True, text=True, env=_clean_env(), cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    kernels = ("pool_keys", "select_rows", "pool_values", "chunk_keys", "expand_chunks",
               "gather_f32", "gather_f16", "gather_bf16", "gather_i64")  # fmt: skip
    for kernel in kernels:
        for arch in (80, 90):
            # an ELF image (0x7f 'E' 'L' 'F') per kernel and architecture
            assert f"k_{kernel}_sm{arch}[] = {{127,69,76,70," in text, (kernel, arch)
    assert text.count("{80, k_") == text.count("{90, k_") == len(kernels)


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed on this machine")
    build = tmp_path_factory.mktemp("plugin") / "build"
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}"],
        capture_output=True, text=True, env=_clean_env(),
    )  # fmt: skip
    said = configure.stderr + configure.stdout
    if configure.returncode != 0 and "CUDAToolkit" in said:
        pytest.skip("the CUDA toolkit's headers (cuda.h) are not installed on this machine")
    if configure.returncode != 0 and "TensorRT headers not found" in said:
        pytest.skip(
            "no TensorRT headers: neither a TensorRT installation (TRT_ROOT) nor "
            "shared/third_party/tensorrt-11.1 beside the checkout"
        )
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-2000:]
    proc = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True,
                          env=_clean_env())  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stdout[-3000:]
    return build / "plugins_trt"


def test_library_exports_the_loading_entry_points_and_links_no_tensorrt(build):
    lib = build / "libnvinfer_plugin_structkv.so"
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    exported = {line.split()[-1] for line in symbols.splitlines() if " T " in line}
    assert {"getCreators", "setLoggerFinder"} <= exported
    assert not [s for s in exported if "structkv" in s.lower()], "internals must stay hidden"
    dynamic = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    needed = [line for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed and not [line for line in needed if "libnvinfer" in line or "libcuda" in line]


def test_host_side_unit_test_passes(build):
    proc = subprocess.run([str(build / "testStructKVCompact")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all StructKVCompact host checks passed" in proc.stdout
    assert proc.stderr.count("expected refusal") == 12  # each refusal logged one clear line


def test_output_shapes_match_the_python_budget(build):
    """K = min(ceil(R N), n - w) + w from the plugin's arithmetic (ratio as a float attribute,
    turned into the same fraction Python's budget uses) for many ratios and lengths."""
    cases = []
    for ratio in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 0.123457, 1 / 3, 0.999999):
        for prompt in (10, 30, 33, 1000, 3840, 19200, 19201, 32768, 131072, 1_000_003):
            for n, window in ((prompt, 8), (prompt, 32), (max(prompt // 3, 40), 8)):
                cases.append((ratio, prompt, n, window))
    argv = [str(build / "testStructKVCompact"), "shapes"]
    for ratio, prompt, n, window in cases:
        argv += [repr(ratio), str(prompt), str(n), str(window)]
    got = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    want = [min(budget(r, p), n - w) + w for r, p, n, w in cases]
    assert [int(x) for x in got] == want


def test_chunk_mode_output_shapes_match_the_python_count(build):
    """Chunk mode's declared output length (getOutputShapes: whole chunks, the remainder, at
    least one chunk, no whole chunk keeps all) equals the torch path's ``selected_count``."""
    from fractions import Fraction

    from structkv.selection import selected_count

    cases = []
    for ratio in (0.05, 0.1, 0.2, 0.5, 1.0, 1 / 3):
        for prompt in (26, 100, 3000, 131072):
            after = max(prompt // 3, 20)  # after the pivot (n < N), down to no whole chunk
            shapes = ((prompt, 8, 16), (prompt, 32, 8), (after, 8, 16), (prompt, 8, 64))
            for n, window, chunk in shapes:
                f = Fraction(ratio).limit_denominator(1_000_000)
                cases.append((f, prompt, n, window, chunk))
    argv = [str(build / "testStructKVCompact"), "chunks"]
    for f, prompt, n, window, chunk in cases:
        argv += [str(f.numerator), str(f.denominator), str(prompt), str(n), str(window), str(chunk)]
    got = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    want = [selected_count(n, budget(float(f), p), w, c) for f, p, n, w, c in cases]
    assert [int(x) for x in got] == want


def _has_cuda_driver() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def test_selftest_library_sizes_the_workspace_and_fails_cleanly_without_a_driver(build):
    """The selftest library (the plugin's enqueue callable on device buffers; the GPU check runs
    it against the torch selection) exports only its C entry points beside the plugin's, links
    neither TensorRT nor libcuda, reports the workspace the README states, and without a GPU
    driver its enqueue fails with one message instead of crashing."""
    import torch

    from structkv.kernels.plugin_selftest import PluginError, PluginSelftest

    lib = build / "libstructkv_plugin_selftest.so"
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    exported = {line.split()[-1] for line in symbols.splitlines() if " T " in line}
    assert {"structkv_selftest_workspace", "structkv_selftest_enqueue"} <= exported
    dynamic = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    assert "libnvinfer" not in dynamic and "libcuda" not in dynamic
    plugin = PluginSelftest(lib)
    # README: rows * n int32 keys, rounded up to 256 bytes (+ rows * n int64 indices, kv_select)
    for n in (100, 4099):
        described = plugin._describe([torch.zeros(1, n, 8), torch.zeros(n)])
        ws = plugin.lib.structkv_selftest_workspace(b"compact", 1, 5, 8, 7, b"max", 0, *described)
        assert ws == (n * 4 + 255) // 256 * 256
        kv = [torch.zeros(2, 3, n, 4), torch.zeros(2, 3, n, 4), torch.zeros(2, 3, n),
              torch.zeros(n, dtype=torch.int64), torch.zeros(2 * n, dtype=torch.int64)]  # fmt: skip
        ws = plugin.lib.structkv_selftest_workspace(b"kv_select", 1, 10, 8, 7, b"max", 0,
                                                    *plugin._describe(kv))  # fmt: skip
        assert ws == (6 * n * 4 + 255) // 256 * 256 + 6 * n * 8
        # chunk mode adds float32 pooled scores and int64 chosen chunks, each 256-aligned
        ws = plugin.lib.structkv_selftest_workspace(b"kv_select", 1, 10, 8, 7, b"max", 16,
                                                    *plugin._describe(kv))  # fmt: skip

        def aligned(size):
            return (size + 255) // 256 * 256

        assert ws == aligned(aligned(6 * n * 4) + 6 * n * 8) + aligned(6 * n * 4) + 6 * n * 8
    with pytest.raises(PluginError, match="refused"):
        plugin.run("bogus", [torch.zeros(1, 50, 8), torch.zeros(50)])
    if not _has_cuda_driver():
        with pytest.raises(PluginError, match="enqueue failed"):
            plugin.run("compact", [torch.zeros(1, 50, 8), torch.zeros(50)])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed on this machine")
def test_plugin_compiles_with_nvcc(build, tmp_path):
    """The same sources through nvcc (as a CUDA build of TensorRT plugins would compile them)."""
    headers = [line for line in (build.parent / "CMakeCache.txt").read_text().splitlines()
               if line.startswith("TensorRT_INCLUDE_DIR")]  # fmt: skip
    trt = headers[0].split("=", 1)[1]
    src = ROOT / "plugins_trt"
    proc = subprocess.run(
        ["nvcc", "-std=c++17", "-x", "cu", "-c", str(src / "structKVCompactPlugin" /
         "structKVCompactPlugin.cpp"), "-o", str(tmp_path / "plugin.o"), "-I", str(src / "common"),
         "-I", str(src / "structKVCompactPlugin"), "-I", str(build / "generated"), "-isystem", trt,
         "-Xcompiler", "-fPIC"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
