"""Where StructKV keeps files it makes: converted models, calibration profiles, built kernels.

A leaf module (standard library only) so that anything may ask for a path without importing
the model loader; ``$STRUCTKV_CACHE`` wins, then ``$XDG_CACHE_HOME/structkv``, then
``~/.cache/structkv``.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The user cache root (``$STRUCTKV_CACHE``, else ``$XDG_CACHE_HOME/structkv``)."""
    base = os.environ.get("STRUCTKV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "structkv"
    )
    return Path(base)
