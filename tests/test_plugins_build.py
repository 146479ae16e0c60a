"""The CUDA compaction kernels must at least compile here (sm_80 and sm_90); running them
needs a GPU, where ctest compares them with a CPU reference."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed on this machine")
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed on this machine")
def test_cuda_kernels_build_for_sm80_and_sm90(tmp_path):
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build)], check=True, capture_output=True)
    proc = subprocess.run(
        ["cmake", "--build", str(build), "-j2", "--", "VERBOSE=1"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sm_80" in proc.stdout and "sm_90" in proc.stdout
    assert (build / "libstructkv_compact.so").is_file() and (build / "test_compact").is_file()
    assert "warning" not in proc.stderr.lower()
