"""StructKV's own ONNX Runtime operator library: ``structkv::CausalAttention`` on CPU.

Why: ONNX Runtime's CPU attention kernels score every query against every key before masking
the causal triangle, so prefill attention ran at half of torch's speed and the engine prefilled
slower than the PyTorch reference (docs/BENCHMARKS.md). ``structkv/kernels/csrc`` holds a causal GQA
kernel that stops at the diagonal; this module compiles it into a custom-op library on first use
(like ``torch.utils.cpp_extension.load``: the pip wheel stays pure Python, the library is built
for the CPU it runs on) and registers it with a session. Engines exported with
``--attention structkv`` need it; ``--attention contrib`` engines do not.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from structkv import paths
from structkv.errors import StructKVError

DOMAIN = "structkv"
OP = "CausalAttention"
#: ``--attention`` names served by this library: fp32 products, or bf16 products with fp32
#: accumulation (the op's ``bf16`` attribute; 2x the multiply-adds per instruction where the
#: CPU has AVX512-BF16, fp32 where it has not).
KERNELS = ("structkv", "structkv-bf16")
SOURCES = ("causal_attention.cc", "ort_op.cc")
HEADERS = ("causal_attention.h",)
# -march=native: built where it runs (the cache key includes the CPU's feature flags).
# -ffast-math's parts, spelled out: they only license reassociation and vector exp (parity tests
# bound the difference). Not the flag itself: with it GCC (12 and older, even with -shared)
# links crtfastmath.o, which sets flush-to-zero / denormals-are-zero for the whole process that
# loads the library — the user's numerics changed by loading an engine.
FAST_MATH = (
    "-fno-math-errno", "-fassociative-math", "-freciprocal-math", "-fno-signed-zeros",
    "-fno-trapping-math", "-ffinite-math-only", "-fno-rounding-math", "-fno-signaling-nans",
    "-fcx-limited-range", "-fexcess-precision=fast",
)  # fmt: skip
FLAGS = (
    "-O3", "-march=native", *FAST_MATH, "-fopenmp-simd", "-fPIC", "-shared", "-std=c++17",
    "-pthread", "-fvisibility=hidden", "-Wno-maybe-uninitialized", "-Wno-psabi",
)  # fmt: skip
_CSRC = Path(__file__).parent / "csrc"


def cpu_flags() -> str:
    """The CPU's feature flags as /proc/cpuinfo lists them (``avx2 avx512f ...``); elsewhere
    whatever the platform says. Kernels and data formats are chosen by them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise StructKVError(
            "the structkv attention operator is built on first use and needs a C++17 compiler: "
            "install g++ (apt install g++) or set CXX, or export the engine with "
            "--attention contrib (ONNX Runtime's own kernel, slower on CPU)"
        )
    return cxx


def cache_dir() -> Path:
    return paths.cache_dir() / "ort_ops"


def library_path() -> Path:
    """The compiled library for this source, compiler flags and CPU; built when missing.
    ``STRUCTKV_ORT_OPS_LIB`` names a prebuilt one instead (machines without a compiler, such as
    serving containers: copy the library built on a machine with the same CPU features)."""
    prebuilt = os.environ.get("STRUCTKV_ORT_OPS_LIB")
    if prebuilt:
        if not Path(prebuilt).is_file():
            raise StructKVError(
                f"STRUCTKV_ORT_OPS_LIB={prebuilt} is not a file: point it at a "
                "libstructkv_ort.so built by structkv.kernels.ort_ops, or unset it"
            )
        return Path(prebuilt)
    cxx = _compiler()
    key = hashlib.sha256()
    for name in SOURCES + HEADERS:
        key.update((_CSRC / name).read_bytes())
    key.update(" ".join((cxx, *FLAGS, platform.machine(), cpu_flags())).encode())
    target = cache_dir() / key.hexdigest()[:16] / "libstructkv_ort.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a concurrent or interrupted build never leaves a
    # half-written library where a session would load it.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, *(str(_CSRC / s) for s in SOURCES), "-o", tmp]
    try:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
            error = done.stderr[-2000:] if done.returncode != 0 else None
        except OSError as e:  # CXX names no runnable program
            error = str(e)
        if error is not None:
            raise StructKVError(
                f"building the structkv attention operator failed ({' '.join(cmd)}):\n"
                f"{error}\nfix the compiler setup (CXX), or export the engine with "
                "--attention contrib"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def available() -> bool:
    """Whether the operator library can be built (or is built) on this machine."""
    try:
        library_path()
    except StructKVError:
        return False
    return True


def has_bf16() -> bool:
    """Whether ``structkv-bf16`` computes in bf16 on this machine (the library was built for a
    CPU with AVX512-BF16); elsewhere it computes in fp32."""
    import ctypes

    return bool(ctypes.CDLL(str(library_path())).structkv_attention_has_bf16())


def register(session_options) -> Path:
    """Register the operator library with an ``onnxruntime.SessionOptions``."""
    path = library_path()
    session_options.register_custom_ops_library(str(path))
    return path
