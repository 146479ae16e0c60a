"""Results, calibration profiles and manifests are written through one helper: whole or not at
all, and readable by others (mkstemp alone would leave them owner-only, 0600)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from structkv.paths import write_json_atomic
from structkv.profile import save_profile


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_json_gets_the_mode_of_a_new_file(tmp_path, umask_022):
    reference = tmp_path / "plain.json"
    reference.write_text("{}")  # what open() gives a new file under this umask: 0644
    out = write_json_atomic(tmp_path / "results.json", {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1}
    assert _mode(out) == _mode(reference) == 0o644
    saved = save_profile({"pivot": 3}, tmp_path / "profiles" / "m.json")
    assert _mode(saved) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"old": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"new": object()})  # not JSON: fails halfway through the dump
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
