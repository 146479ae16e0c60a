"""The frontier: settings grid, the cheapest-setting rule, and the command end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from structkv.eval.frontier import (
    FAMILIES,
    KEEP,
    NEEDLE_AVERAGE,
    report_markdown,
    settings,
    summarise,
)
from structkv.eval.runner import RunConfig, _key


def test_settings_cover_each_methods_budgets_and_share_the_other_knobs():
    specs = settings(["full", "snapkv", "gemfilter", "structkv"], [0.2, 0.5], [0.1, 0.5],
                     {"chunk": 16, "window": 32, "lam": 0.1})  # fmt: skip
    assert specs["full"] == ("full", {"chunk": 16, "window": 32})
    assert specs["snapkv kv=0.5"] == ("snapkv", {"chunk": 16, "window": 32, "r_kv": 0.5})
    assert set(specs) == {
        "full", "snapkv kv=0.1", "snapkv kv=0.5", "gemfilter kv=0.1", "gemfilter kv=0.5",
        "structkv rs=0.2 kv=0.1", "structkv rs=0.2 kv=0.5", "structkv rs=0.5 kv=0.1",
        "structkv rs=0.5 kv=0.5",
    }  # fmt: skip
    assert specs["structkv rs=0.5 kv=0.1"][1] == {
        "chunk": 16, "window": 32, "lam": 0.1, "r_struct": 0.5, "r_kv": 0.1}  # fmt: skip


def test_a_refinement_is_part_of_the_label_so_runs_with_and_without_do_not_mix():
    specs = settings(["full", "structkv"], [0.5], [0.1], {"refine_layer": 14, "r_refine": 0.1})
    assert set(specs) == {"full", "structkv rs=0.5 kv=0.1 ref=14:0.1"}
    assert specs["full"] == ("full", {})  # a knob full context does not have stays off it


def _results(table: dict[str, tuple[float, dict[str, list[float]]]], n=2048) -> dict:
    """results.json entries from {label: (compute fraction, {task: scores per seed})}."""
    out = {}
    for label, (frac, per_task) in table.items():
        for task, scores in per_task.items():
            for seed, s in enumerate(scores):
                out[_key(label, task, n, seed)] = {"score": s, "compute_fraction": frac}
    return out


def test_cheapest_setting_is_least_compute_then_least_kv_among_those_keeping_90_percent():
    specs = settings(["full", "structkv"], [0.2, 0.5], [0.1, 0.5])
    cfg = RunConfig(methods=list(specs), tasks=["niah_single_1", "vt"], lengths=[2048],
                    samples=2, specs=specs)  # fmt: skip
    results = _results({
        "full": (1.0, {"niah_single_1": [1, 1], "vt": [1, 0]}),
        # single needle: 0.2/0.5 keeps 100 % (least compute); tracing: 0.5 at kv 0.1 is 50 %
        # (< 90 %), at kv 0.5 100 %: chosen over nothing cheaper
        "structkv rs=0.2 kv=0.1": (0.60, {"niah_single_1": [1, 0], "vt": [0, 0]}),
        "structkv rs=0.2 kv=0.5": (0.60, {"niah_single_1": [1, 1], "vt": [0, 0]}),
        "structkv rs=0.5 kv=0.1": (0.75, {"niah_single_1": [1, 1], "vt": [0, 0]}),
        "structkv rs=0.5 kv=0.5": (0.75, {"niah_single_1": [1, 1], "vt": [1, 0]}),
    })  # fmt: skip
    data = summarise(results, cfg, specs)["2048"]
    assert data["cheapest"]["structkv"] == {
        "single needle": "structkv rs=0.2 kv=0.5", "tracing": "structkv rs=0.5 kv=0.5"}  # fmt: skip
    row = next(r for r in data["rows"] if r["setting"] == "structkv rs=0.2 kv=0.1")
    assert row["scores"] == {"single needle": 0.5, "tracing": 0.0}
    assert row["pct_full"]["single needle"] == pytest.approx(50.0)
    assert row["compute_fraction"] == pytest.approx(0.60)
    # a family nobody keeps: None, not the least bad setting
    results[_key("full", "vt", 2048, 1)]["score"] = 1
    data = summarise(results, cfg, specs)["2048"]
    assert data["cheapest"]["structkv"]["tracing"] is None
    assert KEEP == 0.9 and set(FAMILIES) >= {"single needle", "tracing"}


def test_needle_average_is_rulers_mean_over_the_needle_tasks_with_its_own_cheapest_setting():
    """Computed here from the per-task means by hand: 3 needle tasks (two families) + vt."""
    specs = settings(["full", "structkv"], [0.2, 0.5], [0.5])
    tasks = ["niah_single_1", "niah_single_2", "niah_multikey_1", "vt"]
    cfg = RunConfig(methods=list(specs), tasks=tasks, lengths=[2048], samples=2, specs=specs)
    results = _results({
        "full": (1.0, {"niah_single_1": [1, 1], "niah_single_2": [1, 0], "niah_multikey_1": [1, 1],
                       "vt": [1, 1]}),
        "structkv rs=0.2 kv=0.5": (0.6, {"niah_single_1": [1, 1], "niah_single_2": [0, 0],
                                         "niah_multikey_1": [1, 0], "vt": [1, 1]}),
        "structkv rs=0.5 kv=0.5": (0.75, {"niah_single_1": [1, 1], "niah_single_2": [1, 0],
                                          "niah_multikey_1": [1, 0], "vt": [0, 0]}),
    })  # fmt: skip
    data = summarise(results, cfg, specs)["2048"]
    rows = {r["setting"]: r for r in data["rows"]}
    assert rows["full"]["scores"][NEEDLE_AVERAGE] == pytest.approx((1 + 0.5 + 1) / 3)
    assert rows["structkv rs=0.2 kv=0.5"]["scores"][NEEDLE_AVERAGE] == pytest.approx(1.5 / 3)
    assert rows["structkv rs=0.5 kv=0.5"]["scores"][NEEDLE_AVERAGE] == pytest.approx(2 / 3)
    assert rows["structkv rs=0.5 kv=0.5"]["pct_full"][NEEDLE_AVERAGE] == pytest.approx(80.0)
    # 0.2 keeps 60 %, 0.5 keeps 80 %: neither reaches 90 %; with a better 0.5 row, 0.5 is chosen
    assert data["cheapest"]["structkv"][NEEDLE_AVERAGE] is None
    results[_key("structkv rs=0.5 kv=0.5", "niah_multikey_1", 2048, 1)]["score"] = 1
    data = summarise(results, cfg, specs)["2048"]
    assert data["cheapest"]["structkv"][NEEDLE_AVERAGE] == "structkv rs=0.5 kv=0.5"
    assert "| needle average |" in report_markdown({"2048": data}, cfg)
    # one needle task incomplete: no needle average (not one over the tasks that exist)
    del results[_key("structkv rs=0.2 kv=0.5", "niah_single_2", 2048, 1)]
    rows = {r["setting"]: r for r in summarise(results, cfg, specs)["2048"]["rows"]}
    assert NEEDLE_AVERAGE not in rows["structkv rs=0.2 kv=0.5"]["scores"]


def test_an_incomplete_family_is_left_out_not_averaged_over_what_exists():
    specs = settings(["full"], [0.2], [0.1])
    cfg = RunConfig(methods=list(specs), tasks=["niah_single_1", "niah_single_2"],
                    lengths=[2048], samples=2, specs=specs)  # fmt: skip
    results = _results({"full": (1.0, {"niah_single_1": [1, 1], "niah_single_2": [0]})})
    assert summarise(results, cfg, specs)["2048"]["rows"] == []


@pytest.mark.real_model
def test_frontier_command_end_to_end_and_refusals(tmp_path):
    out = tmp_path / "frontier"
    cmd = [sys.executable, "-m", "structkv.cli", "eval", "frontier", "--profile", "quick",
           "--samples", "1", "--r-structs", "0.5", "--r-kvs", "0.5", "--out", str(out)]  # fmt: skip
    timed = [*cmd[:-2], "--speed-repeats", "3", *cmd[-2:]]
    proc = subprocess.run(timed, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "frontier.json").read_text())
    # the cheapest settings (and full) timed in one paired benchmark at the longest length
    timed_rows = {r["setting"]: r for r in doc["speed"]}
    assert "full" in timed_rows and timed_rows["full"]["speedup_vs_full"] == 1.0
    assert set(timed_rows) - {"full"} <= {s for per in doc["summary"]["512"]["cheapest"].values()
                                          for s in per.values() if s}  # fmt: skip
    rows = {r["setting"]: r for r in doc["summary"]["512"]["rows"]}
    assert set(rows) == {"full", "snapkv kv=0.5", "structkv rs=0.5 kv=0.5"}
    assert rows["full"]["compute_fraction"] == 1.0
    assert 0.5 < rows["structkv rs=0.5 kv=0.5"]["compute_fraction"] < 1.0
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 3 * 2  # settings x (niah_single_1, vt) x 1 sample
    assert (out / "frontier-compute-512.png").stat().st_size > 0
    report = (out / "frontier.md").read_text()
    # --report-only rebuilds the same report from results.json without loading the model
    (out / "frontier.md").unlink()
    proc = subprocess.run([*cmd, "--report-only"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and (out / "frontier.md").read_text() == report
    for bad, needle in (
        (["--r-struct", "0.2"], "--r-structs"),
        (["--r-kvs", "0.1,1.5"], "fractions in (0, 1]"),
        (["--methods", "nope"], "unknown method"),
        (["--speed-repeats", "2"], "--speed-repeats"),
    ):
        proc = subprocess.run([*cmd[:-2], "--out", str(tmp_path / "bad"), *bad],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
