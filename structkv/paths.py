"""Where StructKV keeps files it makes: converted models, calibration profiles, built kernels.

A leaf module (standard library only) so that anything may ask for a path without importing
the model loader; ``$STRUCTKV_CACHE`` wins, then ``$XDG_CACHE_HOME/structkv``, then
``~/.cache/structkv``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """The user cache root (``$STRUCTKV_CACHE``, else ``$XDG_CACHE_HOME/structkv``)."""
    base = os.environ.get("STRUCTKV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "structkv"
    )
    return Path(base)


def write_json_atomic(path: Path, data: object) -> Path:
    """Write ``data`` as JSON to ``path`` through a temporary file and one rename, so a crash
    leaves the old file or the new one, never half of either. mkstemp makes the temporary file
    owner-only; the result gets the mode any new file would (0666 less the umask), because
    results, profiles and manifests are meant to be read by others."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
