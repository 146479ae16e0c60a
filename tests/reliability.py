"""The reliability suite's bookkeeping: every case a ``test_reliability_*`` module tries is
recorded (class, case, handled or not, and why not), so docs/RELIABILITY.md is written from
what the suite actually did (scripts/reliability_report.py), not from a list kept by hand.

A case is *handled* when its outcome is the specified one: one ``error:`` line naming the
problem and exit 2 on the command line, a 4xx/5xx JSON error over HTTP, nothing half-written,
the process or server still usable. The tests assert exactly that; this module only records.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from contextlib import contextmanager

#: Where the records go (JSON lines); unset: nothing is written (a plain `make test`).
LOG = "STRUCTKV_RELIABILITY_LOG"


def record(cls: str, case: str, handled: bool, detail: str = "") -> None:
    path = os.environ.get(LOG)
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"class": cls, "case": case, "handled": handled,
                            "detail": detail[:400]}) + "\n")  # fmt: skip


@contextmanager
def case(cls: str, name: str):
    """Record the case as handled if the block's assertions pass, else as not handled (with
    the assertion's message) and re-raise: the test fails too."""
    try:
        yield
    except BaseException as e:
        record(cls, name, False, f"{type(e).__name__}: {e}")
        raise
    record(cls, name, True)


def run_cli(main, argv: list[str]) -> tuple[object, str, str]:
    """``main(argv)`` in this process: (return code or the exception it let out, stdout,
    stderr). A SystemExit is its code; any other exception is returned, not raised."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException as e:  # the outcome under test
            rc = e
    return rc, out.getvalue(), err.getvalue()


def assert_one_error(rc, err: str, *needles: str) -> str:
    """Exit 2, exactly one ``error:`` line, no traceback, and the line names ``needles``."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2, f"exit {rc!r}, stderr {err[-300:]!r}"
    assert "Traceback" not in err, err[-500:]
    assert len(lines) == 1, f"{len(lines)} error lines: {err[-300:]!r}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]
