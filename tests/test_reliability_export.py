"""Reliability, export under faults: `structkv-export` stopped at several points (the disk state a
SIGKILL there leaves) and SIGKILLed at the last never leaves a directory that loads (and the next
export cleans up after it); an engine at --out
survives a killed `--force` re-export (the replacement is one atomic swap); a file-size limit
(RLIMIT_FSIZE, as a full disk behaves) is one clear error with no temporary files left; an
unwritable --out parent is one clear error. Real subprocesses, real signals."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import exported_engine
from reliability import assert_one_error, case, run_cli

from structkv.export.exporter import main as export_main
from structkv.manifest import MANIFEST
from structkv.runtime.engine import Engine

CLS = "Export under faults"
MODEL = ["--model", "tiny-llama", "--pivot", "2"]


def _export_cmd(out, *extra, jobs: int = 1) -> list[str]:
    """One tracing process by default: the kill points follow its fixed order of graphs. An
    export that is not killed runs with two (the CLI's default here), which is faster."""
    return [sys.executable, "-m", "structkv.export.exporter", *MODEL, "--jobs", str(jobs),
            "--out", str(out), *extra]  # fmt: skip


def _stopped_at(cmd: list[str], points):
    """Start ``cmd`` and freeze it (SIGSTOP, its whole process group) at each of ``points`` in
    turn: ``seconds`` after start, or after ``marker`` appears on its stderr and then ``seconds``.
    Yields each label while the process is frozen, resumes it after, and SIGKILLs it at the last.

    A frozen process has written exactly what a process SIGKILLed at that instant leaves on disk
    (neither runs another instruction: no cleanup, no flush), so one export checked at every
    point tests what one killed export per point would, in a third of the time; the last point
    is a real SIGKILL, and the next export must clean up after it."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            start_new_session=True)  # fmt: skip
    start = time.monotonic()
    try:
        for i, (label, seconds, marker) in enumerate(points):
            if marker is not None:
                for line in proc.stderr:
                    if marker in line:
                        break
            time.sleep(max(0.0, seconds - (0 if marker else time.monotonic() - start)))
            last = i == len(points) - 1
            os.killpg(proc.pid, signal.SIGKILL if last else signal.SIGSTOP)
            if last:
                proc.wait(60)
                assert proc.returncode == -signal.SIGKILL, f"export ended by itself first ({label})"
            else:
                assert proc.poll() is None, f"export ended by itself ({proc.returncode}) first"
            yield label
            if not last:
                os.killpg(proc.pid, signal.SIGCONT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)


def _loads(path) -> bool:
    try:
        Engine.load(path)
        return True
    except Exception:
        return False


#: (label, seconds after start or after the marker line, marker on stderr)
KILL_POINTS = [
    ("while importing", 0.5, None),
    ("while tracing pre_pivot", 0.2, "attention kernel"),
    ("after pre_pivot", 0.1, "pre_pivot.onnx traced"),
    ("while tracing decode", 2.0, "kv_select.onnx traced"),
    ("while streaming weights and checking", 0.05, "decode.onnx traced"),
]


def test_sigkill_at_any_point_never_leaves_an_engine_that_loads(tmp_path):
    out = tmp_path / "engine"
    for label in _stopped_at(_export_cmd(out), KILL_POINTS):
        with case(CLS, f"SIGKILL {label}"):
            # --out is absent, or (killed after its final rename) the complete engine
            assert not out.exists() or _loads(out), "a half-written engine at --out"
            for left in tmp_path.iterdir():  # leftovers of the killed process never load
                assert left == out or not _loads(left), f"{left.name} loads"
    shutil.rmtree(out, ignore_errors=True)
    with case(CLS, "export after killed ones: succeeds and removes their leftovers"):
        assert subprocess.run(_export_cmd(out, jobs=2), capture_output=True).returncode == 0
        assert _loads(out)
        assert [p.name for p in tmp_path.iterdir()] == ["engine"], list(tmp_path.iterdir())


def test_killed_force_reexport_keeps_the_old_engine(tmp_path, tmp_path_factory):
    out = tmp_path / "engine"
    # the engine to keep: a copy of the session's tiny engine (λ 0.5; the re-exports use 0.3)
    shutil.copytree(exported_engine("tiny-llama", "contrib", tmp_path_factory), out)
    assert _loads(out)
    kept_old = 0
    before = json.loads((out / MANIFEST).read_text())
    for label in _stopped_at(_export_cmd(out, "--force", "--lambda", "0.3"), KILL_POINTS[1:]):
        with case(CLS, f"--force re-export SIGKILLed {label}: old or new engine, whole"):
            assert _loads(out), "the engine at --out no longer loads"
            after = json.loads((out / MANIFEST).read_text())
            # the old engine, or (killed after the swap) the complete new one — never a mix
            assert after == before or after["method"]["lam"] == 0.3, "--out is neither"
            kept_old += after == before
    assert kept_old >= 3, "most kill points are before the swap: the old engine must survive"
    with case(CLS, "--force re-export completes: new engine in place, nothing else left"):
        done = subprocess.run(_export_cmd(out, "--force", "--lambda", "0.3", jobs=2),
                              capture_output=True)  # fmt: skip
        assert done.returncode == 0, done.stderr[-500:]
        assert json.loads((out / MANIFEST).read_text())["method"]["lam"] == 0.3
        assert [p.name for p in tmp_path.iterdir()] == ["engine"]


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead

    return apply


@pytest.mark.parametrize("limit", [64 * 1024, 400 * 1024])
def test_a_full_disk_is_one_error_and_leaves_nothing(tmp_path, limit):
    """RLIMIT_FSIZE makes every write past ``limit`` bytes fail as a full disk does (EFBIG;
    ENOSPC takes the same path): at 64 KiB a graph file fails, at 400 KiB weights.bin."""
    out = tmp_path / "engine"
    with case(CLS, f"disk full (file size limit {limit // 1024} KiB)"):
        proc = subprocess.run(_export_cmd(out, jobs=2), capture_output=True, text=True,
                              preexec_fn=_limit_file_size(limit))  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-800:]
        assert_one_error(2, proc.stderr, "full or a file size limit was reached")
        assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_unwritable_parents_are_one_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for label, out in (("/proc (not writable)", "/proc/structkv-engine"),
                       ("a file as the parent", str(blocker / "engine"))):  # fmt: skip
        with case(CLS, f"--out under {label}"):
            rc, _, err = run_cli(export_main, [*MODEL, "--out", out])
            assert_one_error(rc, err, "writable directory")
    if os.geteuid() != 0:  # root writes anywhere; a read-only directory binds only others
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with case(CLS, "--out under a read-only directory"):
            rc, _, err = run_cli(export_main, [*MODEL, "--out", str(ro / "engine")])
            assert_one_error(rc, err, "writable directory")
