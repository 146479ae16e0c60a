"""Per-model calibration profiles (method.md §6): where they live and how they are read.

The embedded model's profile ships inside the package (``structkv/profiles/``); others are
written to the user cache by ``structkv calibrate`` and found there by model id.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from structkv.paths import cache_dir, write_json_atomic

FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).parent / "profiles"


def _file_name(model_id: str) -> str:
    if "/" not in model_id and len(model_id) < 64:
        return f"{model_id}.json"
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:16]
    return f"{Path(model_id).name}-{digest}.json"


def user_profile_path(model_id: str) -> Path:
    return cache_dir() / "profiles" / _file_name(model_id)


def find_profile(model_id: str) -> dict | None:
    """The user's calibration for ``model_id`` if any, else the shipped one, else None."""
    for path in (user_profile_path(model_id), SHIPPED_DIR / _file_name(model_id)):
        if path.is_file():
            profile = json.loads(path.read_text())
            if profile.get("format") == FORMAT_VERSION:
                return profile
    return None


def save_profile(profile: dict, path: Path) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half a profile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(path, profile)


def resolve_method(method, model_id: str, log=None):
    """``method`` with its model-dependent defaults from ``model_id``'s calibration profile.

    The I/O side of :meth:`structkv.methods.Method.with_profile`: find the profile, and tell
    the user (``log``, default stderr) when the method fell back to a preset."""
    resolved, note = method.with_profile(find_profile(model_id))
    if note is not None:
        message = (
            f"[structkv] {model_id}: {note}. Run `structkv calibrate --model {model_id}` for a "
            "calibrated one."
        )
        if log is None:
            print(message, file=sys.stderr)
        else:
            log(message)
    return resolved
