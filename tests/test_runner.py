"""The evaluation runner: resumable, errors counted, table of means and % of full."""

from __future__ import annotations

import json

import pytest
from conftest import ByteTokenizer

from structkv.eval.runner import RunConfig, results_table, run_ruler
from structkv.models import LoadedModel, tiny_model


def _lm():
    lm = tiny_model("tiny-llama", num_layers=4, seed=0)
    return LoadedModel(lm.model, ByteTokenizer(), "tiny-runner-test")


def test_run_resumes_and_tables(tmp_path):
    lm = _lm()
    cfg = RunConfig(["full", "snapkv"], ["niah_single_1"], [200], samples=2, max_new_tokens=3)
    first = run_ruler(lm, cfg, tmp_path)
    assert len(first) == 4 and all(e["score"] in (0.0, 1.0) for e in first.values())
    # Mark one entry so a re-run that recomputed it would overwrite the marker.
    data = json.loads((tmp_path / "results.json").read_text())
    key = "full|niah_single_1|200|0"
    data[key]["output"] = "MARKER"
    (tmp_path / "results.json").write_text(json.dumps(data))
    cfg.samples = 3  # one more sample per method: only those two are run
    second = run_ruler(lm, cfg, tmp_path)
    assert len(second) == 6 and second[key]["output"] == "MARKER"
    assert (tmp_path / "results.md").read_text().startswith("| method | niah_single_1@200")


def test_resuming_with_another_configuration_under_the_same_name_is_refused(tmp_path):
    """A recalibrated profile (or other knobs) changes what a method name means: a resumed run
    must not mix the two configurations' answers in one column."""
    from structkv.errors import StructKVError

    lm = _lm()
    cfg = RunConfig(["snapkv"], ["niah_single_1"], [200], samples=1, max_new_tokens=2)
    first = run_ruler(lm, cfg, tmp_path)
    assert first["snapkv|niah_single_1|200|0"]["method"]["r_kv"] == 0.1
    cfg.samples, cfg.knobs = 2, {"r_kv": 0.3}
    with pytest.raises(StructKVError, match="another profile or knobs"):
        run_ruler(lm, cfg, tmp_path)
    cfg.knobs = {"r_kv": 0.1}  # the same configuration resumes
    assert len(run_ruler(lm, cfg, tmp_path)) == 2


def test_table_by_hand():
    cfg = RunConfig(["full", "snapkv"], ["t"], [10], samples=2)
    results = {
        "full|t|10|0": {"score": 1.0},
        "full|t|10|1": {"score": 0.5},
        "snapkv|t|10|0": {"score": 0.25},
        "snapkv|t|10|1": {"score": None, "error": "RuntimeError: x"},
    }
    table = results_table(results, cfg).splitlines()
    assert table[2] == "| full | 75.0 | 75.0 | 100.0 | 0 |"
    assert table[3] == "| snapkv | 25.0 | 25.0 | 33.3 | 1 |"


def test_wall_time_counts_each_shared_prompt_once():
    from structkv.eval.runner import _wall_time

    results = {  # two methods shared one 60 s generation; a second prompt took 30 s
        "full|t|1024|0": {"score": 1, "group_seconds": 60.0},
        "snapkv|t|1024|0": {"score": 1, "group_seconds": 60.0},
        "full|t|2048|0": {"score": 1, "group_seconds": 30.0},
    }
    assert _wall_time(results).strip() == (
        "Wall time (generation only): 1.5 min (1024: 1.0 min, 2048: 0.5 min)."
    )


@pytest.mark.real_model
def test_quick_profile_on_the_embedded_model(tmp_path, capsys, monkeypatch):
    """`structkv eval ruler --profile quick` (CI-sized) runs end to end, then resumes to a no-op:
    the second run generates nothing (any generation would raise) and rewrites the same table."""
    from structkv.cli import main
    from structkv.eval import runner

    assert main(["eval", "ruler", "--profile", "quick", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [row.split(" | ")[0] for row in table[2:5]] == ["| full", "| snapkv", "| structkv"]
    assert table[6].startswith("Wall time (generation only): ")
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 3 * 2 * 2 and all("error" not in e for e in results.values())

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run generated again")

    monkeypatch.setattr(runner, "generate_many", refuse)
    monkeypatch.setattr(runner, "generate_ids", refuse)
    assert main(["eval", "ruler", "--profile", "quick", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == table
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_length_tables_by_hand(tmp_path):
    """Per-length table: needle mean over niah_* tasks only, % of full, '–' until complete;
    `--report-only` rewrites results.md from results.json without loading a model."""
    from structkv.cli import main
    from structkv.eval.runner import length_tables

    cfg = RunConfig(["full", "snapkv"], ["niah_single_1", "vt"], [10, 20], samples=1)
    results = {
        "full|niah_single_1|10|0": {"score": 1.0},
        "full|vt|10|0": {"score": 0.5},
        "snapkv|niah_single_1|10|0": {"score": 0.5},
        "snapkv|vt|10|0": {"score": 0.5},
        "full|niah_single_1|20|0": {"score": 1.0},  # 20 tokens: only this cell so far
    }
    lines = length_tables(results, cfg).splitlines()
    assert lines[1] == "### 10 tokens"
    assert lines[5] == "| full | 100.0 | 50.0 | 100.0 | 75.0 | 100.0 | 100.0 |"
    assert lines[6] == "| snapkv | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 66.7 |"
    assert "| full | 100.0 | – | 100.0 | – | 100.0 | – |" in lines
    assert "| snapkv | – | – | – | – | – | – |" in lines
    (tmp_path / "results.json").write_text(json.dumps(results))
    args = ["eval", "ruler", "--methods", "full,snapkv", "--tasks", "niah_single_1,vt"]
    args += ["--lengths", "10,20", "--samples", "1", "--out", str(tmp_path), "--report-only"]
    assert main(args) == 0
    written = (tmp_path / "results.md").read_text()
    assert "| snapkv | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 66.7 |" in written


def test_target_table_pools_lengths_by_hand():
    """The 2K-4K verdict table: every task x length cell weighs the same, as % of full's mean;
    nothing until every cell of those lengths is scored."""
    from structkv.eval.runner import target_table

    cfg = RunConfig(["full", "snapkv"], ["niah_single_1", "vt"], [10, 20], samples=1)
    scores = {
        ("full", "niah_single_1", 10): 1.0, ("full", "vt", 10): 0.5,
        ("full", "niah_single_1", 20): 1.0, ("full", "vt", 20): 0.0,
        ("snapkv", "niah_single_1", 10): 0.5, ("snapkv", "vt", 10): 0.5,
        ("snapkv", "niah_single_1", 20): 0.0, ("snapkv", "vt", 20): 1.0,
    }  # fmt: skip
    results = {f"{m}|{t}|{n}|0": {"score": v} for (m, t, n), v in scores.items()}
    lines = target_table(results, cfg, lengths=(10, 20)).splitlines()
    assert lines[1] == "### Pooled over 10-20"
    # full: needle (100 + 100) / 2 = 100, all (100 + 50 + 100 + 0) / 4 = 62.5
    # snapkv: needle (50 + 0) / 2 = 25 -> 25 %; all (50 + 50 + 0 + 100) / 4 = 50 -> 80 %
    assert lines[-2:] == ["| full | 100.0 | 100.0 |", "| snapkv | 25.0 | 80.0 |"]
    del results["snapkv|vt|20|0"]
    # vt is not a needle task: the needle column stands, the all-task one waits
    assert target_table(results, cfg, lengths=(10, 20)).splitlines()[-1] == "| snapkv | 25.0 | – |"
    del results["full|vt|20|0"]
    assert target_table(results, cfg, lengths=(10, 20)) == ""
