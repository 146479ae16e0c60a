#!/usr/bin/env bash
# Start a real tritonserver (2.51, bundled in the nvidia-pytriton wheel; runs on CPU) on a model
# repository written by `structkv deploy triton`, listening on 127.0.0.1 only.
#
#   scripts/triton_server.sh REPO [HTTP_PORT [GRPC_PORT [METRICS_PORT]]]   (8000 8001 8002)
#
# The Triton environment is the one `python scripts/make_peer_env.py .venv-triton --extra
# tritonserver` builds (make test does); another one is named by STRUCTKV_TRITON_ENV. Extra
# tritonserver flags go in TRITON_ARGS. What the bundled binary needs, worked out once here:
#  - the wheel's nvidia_pytriton.libs on LD_LIBRARY_PATH (libtritonserver and its deps);
#  - a --backend-directory holding python/{libtriton_python.so, triton_python_backend_utils.py}
#    and the Python stub built for this interpreter's version (the wheel has 3.8 - 3.13);
#  - the stub must load the libpython of the interpreter the environment was made from, not
#    another build of the same version (a mismatch fails with `_thread.RLock ... _recursion_count`),
#    so that interpreter's lib dir comes first on LD_LIBRARY_PATH;
#  - the stub's embedded Python finds its environment through `python3` on PATH (pyvenv.cfg),
#    so the environment's bin dir comes first on PATH: model.py imports structkv from there.
# The server runs in the foreground (exec): stop it with SIGINT or SIGTERM.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 4 || "$1" == -* ]]; then
    echo "usage: $0 REPO [HTTP_PORT [GRPC_PORT [METRICS_PORT]]]" >&2
    exit 2
fi
repo=$(cd "$1" 2>/dev/null && pwd) || { echo "error: model repository $1 does not exist" >&2; exit 2; }
http=${2:-8000} grpc=${3:-8001} metrics=${4:-8002}
here=$(cd "$(dirname "$0")/.." && pwd)
env=${STRUCTKV_TRITON_ENV:-$here/.venv-triton}
python=$env/bin/python
if [[ ! -x $python ]]; then
    echo "error: no Triton environment at $env; build it with:" >&2
    echo "  python scripts/make_peer_env.py .venv-triton --extra tritonserver" >&2
    exit 2
fi
read -r pkg version libdir < <("$python" -c '
import os, sys, sysconfig
import pytriton
print(os.path.dirname(pytriton.__file__), "%d.%d" % sys.version_info[:2], sysconfig.get_config_var("LIBDIR"))
') || { echo "error: nvidia-pytriton is not installed in $env" >&2; exit 2; }
dist=$pkg/tritonserver
stub=$dist/python_backend_stubs/$version/triton_python_backend_stub
if [[ ! -x $stub ]]; then
    echo "error: nvidia-pytriton has no Python backend stub for Python $version" >&2
    exit 2
fi
backends=$env/triton-backends
if [[ ! -x $backends/python/triton_python_backend_stub ]] ||
   [[ $stub -nt $backends/python/triton_python_backend_stub ]]; then
    mkdir -p "$backends"
    fresh=$(mktemp -d "$backends/.python.XXXXXX")
    cp "$dist/backends/python/libtriton_python.so" \
       "$dist/backends/python/triton_python_backend_utils.py" "$stub" "$fresh/"
    rm -rf "$backends/python" && mv "$fresh" "$backends/python"
fi

export PATH=$env/bin:$PATH
export LD_LIBRARY_PATH=$libdir:$pkg/../nvidia_pytriton.libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# shellcheck disable=SC2086  # TRITON_ARGS is a list of flags
exec "$dist/bin/tritonserver" \
    --model-repository="$repo" \
    --backend-directory="$backends" \
    --cache-directory="$dist/caches" \
    --http-address=127.0.0.1 --http-port="$http" \
    --grpc-address=127.0.0.1 --grpc-port="$grpc" \
    --metrics-address=127.0.0.1 --metrics-port="$metrics" \
    --allow-gpu-metrics=false \
    --exit-timeout-secs=8 \
    --log-verbose=0 \
    ${TRITON_ARGS:-}
