#!/usr/bin/env bash
# StructKV's GPU checks, as-is on a machine with an NVIDIA GPU (the device tool's H200, or a
# user's): one PASS / FAIL / SKIP line per check plus timings (scripts/gpu_check.py lists them).
# Needs torch with CUDA; OpenAI Triton, TensorRT (Python package and headers/libraries), cmake
# and onnxruntime-extensions for the checks that use them (each one skips, saying why, when its
# piece is missing). Downloads nothing. Exit 1 if a check failed.
#   bash scripts/gpu_check.sh               (STRUCTKV_GPU_WORK=DIR keeps exports between runs)
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ! "$py" -c "import structkv.export, structkv.runtime" 2>/dev/null; then
    # this checkout, installed without touching the network (its dependencies must be there)
    "$py" -m pip install -q --no-deps --no-build-isolation -e . || exit 2
fi
unset TRITON_INTERPRET
exec "$py" scripts/gpu_check.py "$@"
