"""Create a side environment (kvpress peer, tritonserver) on top of *this* interpreter.

Why not ``python -m venv --system-site-packages``: inside a virtualenv that exposes the *base*
interpreter's packages, not the active environment's, so a venv user's torch is invisible and
pip pulls the CUDA build of torch (GBs of nvidia-* wheels) for a CPU-only check. Instead the
peer env gets a ``.pth`` file that appends the running interpreter's own site directories
(virtualenv or not) after its own, and pip is constrained to the torch that is already
installed, so it has nothing to download. kvpress needs transformers < 5.3: that one version
is installed in the peer env itself and shadows the main environment's. The same holds for the
Triton env: nvidia-pytriton pins numpy < 2, installed there and shadowing the main numpy.

Usage (from the repository root; ``make test`` runs both)::

    python scripts/make_peer_env.py .venv-peer
    python scripts/make_peer_env.py .venv-triton --extra tritonserver
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import sysconfig
import tempfile
import venv
from pathlib import Path


def site_dirs() -> list[str]:
    """The running interpreter's site-packages directories, in its own search order."""
    dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths()[key]
        if path not in dirs:
            dirs.append(path)
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def main(target: str, extra: str = "peer") -> int:
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        print("error: install torch first (make install takes the CPU wheel)", file=sys.stderr)
        return 2
    env = Path(target).resolve()
    venv.EnvBuilder(with_pip=True, clear=True).create(env)
    python = env / "bin" / "python"
    purelib = subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True,
    ).strip()
    # addsitedir (not a bare path) so the main env's own .pth files (editable installs) apply.
    lines = [f"import site; site.addsitedir({d!r})" for d in site_dirs()]
    (Path(purelib) / "_structkv_main_env.pth").write_text("\n".join(lines) + "\n")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(f"torch=={torch_version}\n")  # never a different (CUDA) build
    subprocess.check_call(
        [str(python), "-m", "pip", "install", "-q", "-c", f.name, "-e", f".[{extra}]"]
    )
    own = [p.name for p in Path(purelib).iterdir()]
    # CUDA torch drags in nvidia_cublas_*, nvidia_cudnn_*, ...; nvidia_pytriton is wanted.
    pulled = sorted(
        n
        for n in own
        if (n.startswith(("nvidia", "torch-", "torch_")) or n == "torch")
        and not n.startswith("nvidia_pytriton")
    )
    if pulled:
        print(f"error: the {extra} env installed {pulled}; it must reuse torch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", default=".venv-peer", help="environment directory")
    parser.add_argument(
        "--extra",
        default="peer",
        choices=("peer", "tritonserver"),
        help="which optional dependencies of pyproject.toml the environment gets",
    )
    args = parser.parse_args()
    sys.exit(main(args.target, args.extra))
