"""`make test-big`: a checkpoint larger than the export's memory limit exports, and the engine
matches torch (issue 16). Runs scripts/export_big.py, the same script whose output is in
docs/BENCHMARKS.md; minutes and GBs of disk, so it is out of `make test` (marker ``big``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.big
@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux prlimit")
@pytest.mark.skipif(not Path("/usr/bin/time").is_file(), reason="needs GNU /usr/bin/time")
def test_export_of_a_checkpoint_larger_than_the_memory_limit(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    if free < 16 * 2**30:
        pytest.skip(f"needs ~16 GB of free disk in {tmp_path}, has {free / 2**30:.1f} GB")
    out = tmp_path / "result.json"
    script = ROOT / "scripts" / "export_big.py"
    command = [sys.executable, str(script), "--work", str(tmp_path / "w"), "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True)
    result = json.loads(out.read_text())
    assert run.returncode == 0, run.stderr[-3000:]
    assert result["checkpoint"]["bytes"] >= 3 * 10**9 and result["checkpoint"]["shards"] >= 3
    assert result["limit_bytes"] < result["checkpoint"]["bytes"]
    assert result["export"]["returncode"] == 0
    assert result["tokens"]["engine"] == result["tokens"]["torch"]
    assert len(result["tokens"]["engine"]) == 8
    logits = result["first_step_logits"]
    assert logits["top10_engine"] == logits["top10_torch"] and logits["max_abs_diff"] < 1e-3
    assert all(result["checks"].values()), result["checks"]
