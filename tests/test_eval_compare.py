"""`structkv eval compare`: paired wins, the sign test and the bootstrap interval, checked
against values computed here by hand (binomial sums, means), and its errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from structkv.cli import main
from structkv.errors import StructKVError
from structkv.eval.compare import bootstrap_interval, compare, paired_cells, sign_test

A = "structkv rs=0.2 kv=0.1"
B = "gemfilter kv=0.1"


def results_from(scores: dict[tuple[str, str, int], list[float]]) -> dict:
    """(label, task, length) -> scores by seed, as the runner writes results.json."""
    out = {}
    for (label, task, length), values in scores.items():
        for seed, value in enumerate(values):
            out[f"{label}|{task}|{length}|{seed}"] = {"score": value, "output": "..."}
    return out


def test_sign_test_matches_the_binomial_tail():
    # 3 vs 1: P(X <= 1) for X ~ Bin(4, 1/2) is 5/16, doubled
    assert sign_test(3, 1) == pytest.approx(10 / 16)
    assert sign_test(1, 3) == sign_test(3, 1)
    assert sign_test(10, 0) == pytest.approx(2 * 0.5**10)
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 5) == 1.0  # capped: the two tails overlap at the middle
    n, k = 30, 9
    assert sign_test(n - k, k) == pytest.approx(
        2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    )


def test_wins_averages_and_pairs_per_cell():
    results = results_from(
        {
            (A, "niah_single_2", 4096): [1, 1, 0, 1, 0],
            (B, "niah_single_2", 4096): [1, 0, 0, 0, 1],
            (A, "niah_multivalue", 4096): [0.25, 0.5, 0, 1],
            (B, "niah_multivalue", 4096): [0.5, 0.5, 0, 1],
        }
    )
    report = compare(results, "structkv", "gemfilter")
    assert (report["a"], report["b"]) == (A, B)
    cells = {c["task"]: c for c in report["cells"]}
    assert (cells["niah_single_2"]["a_wins"], cells["niah_single_2"]["b_wins"]) == (2, 1)
    assert (cells["niah_multivalue"]["a_wins"], cells["niah_multivalue"]["b_wins"]) == (0, 1)
    # mean over cells of each cell's mean (cells of 5 and 4 prompts, not pooled over prompts):
    # (60 + 43.75) / 2 and (40 + 50) / 2
    assert report["average_a"] == pytest.approx(51.88, abs=0.01)
    assert report["average_b"] == pytest.approx(45.0)
    assert report["difference"] == pytest.approx(6.88, abs=0.01)
    assert (report["a_wins"], report["b_wins"]) == (2, 2)
    assert report["sign_test_p"] == 1.0
    lo, hi = report["interval95"]
    assert lo <= report["difference"] <= hi


def test_bootstrap_interval_collapses_when_every_pair_differs_the_same():
    results = results_from(
        {
            (A, "t1", 2048): [1, 1, 1, 1],
            (B, "t1", 2048): [0, 0, 0, 0],
            (A, "t2", 2048): [1, 0, 1],
            (B, "t2", 2048): [1, 0, 1],
        }
    )
    cells = paired_cells(results, A, B)
    assert bootstrap_interval(cells) == pytest.approx((50.0, 50.0))  # (100 + 0) / 2 always
    same = paired_cells(results_from({(A, "t", 1): [1, 0, 1], (B, "t", 1): [1, 0, 1]}), A, B)
    assert bootstrap_interval(same) == (0.0, 0.0)


def test_a_real_difference_has_an_interval_above_zero_and_a_small_p():
    a = [1.0] * 12 + [0.0] * 8
    b = [0.0] * 12 + [0.0] * 8
    report = compare(results_from({(A, "t", 4096): a, (B, "t", 4096): b}), A, B)
    assert report["sign_test_p"] == pytest.approx(2 * 0.5**12, abs=1e-4)
    assert report["interval95"][0] > 0


def test_errored_answers_leave_both_sides_of_the_pair():
    results = results_from({(A, "t", 1): [1, 1, 0], (B, "t", 1): [0, 1, 0]})
    results[f"{B}|t|1|0"] = {"error": "boom"}  # B failed the prompt A won
    results[f"{A}|t|1|3"] = {"score": 1.0}  # B never answered seed 3
    (cell,) = paired_cells(results, A, B)
    assert (cell.a, cell.b) == ([1.0, 0.0], [1.0, 0.0])
    assert compare(results, A, B, tasks=["t"])["prompts"] == 2


def test_label_resolution_errors_name_the_fix():
    results = results_from(
        {(A, "t", 1): [1], ("structkv rs=0.5 kv=0.5", "t", 1): [1], (B, "t", 1): [0]}
    )
    paper = results_from({("structkv-paper rs=0.2 kv=0.1", "t", 1): [0], (A, "t", 1): [1]})
    assert compare(paper, "structkv", "structkv-paper")["a"] == A  # a name, not a prefix
    with pytest.raises(StructKVError, match=r"names 2 labels.*whole label in quotes"):
        compare(results, "structkv", B)
    with pytest.raises(StructKVError, match=r"no answers labelled 'snapkv'.*labels: "):
        compare(results, "snapkv", B)
    with pytest.raises(StructKVError, match="both names resolve"):
        compare(results, B, "gemfilter")
    with pytest.raises(StructKVError, match="no prompt in common on tasks other"):
        compare(results, A, B, tasks=["other"])


def test_cli_report_json_and_errors(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    scores = {(A, "niah_single_2", 4096): [1, 1, 1, 0], (B, "niah_single_2", 4096): [0, 0, 1, 0]}
    (run / "results.json").write_text(json.dumps(results_from(scores)))
    proc = subprocess.run(
        [sys.executable, "-m", "structkv.cli", "eval", "compare", str(run), A, "gemfilter"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| niah_single_2 | 4096 | 4 | 75.0 | 25.0 | 2 | 0 |" in proc.stdout
    assert "A - B = +50.00 points" in proc.stdout and "sign test p = 0.5000" in proc.stdout
    assert main(["eval", "compare", str(run / "results.json"), A, B, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["a_wins"] == 2
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    for path, message in (
        (tmp_path / "missing", "does not exist; pass an eval --out directory"),
        (tmp_path / "bad.json", "is not valid JSON"),
        (tmp_path / "list.json", "is not an eval results.json"),
    ):
        assert main(["eval", "compare", str(path), A, B]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_b_from_another_run_pairs_the_same_prompts_and_refuses_other_ones(tmp_path, capsys):
    """The same label run twice with other knobs lives in two --out directories: --b-out pairs
    them by seed, and a seed whose expected answers differ (another prompt) is an error."""

    def run_dir(name: str, scores: list[float], answers: list[str]) -> str:
        out = tmp_path / name
        out.mkdir()
        entries = {
            f"{A}|niah_single_2|2048|{seed}": {"score": s, "answers": f"['{answer}']"}
            for seed, (s, answer) in enumerate(zip(scores, answers))
        }
        (out / "results.json").write_text(json.dumps(entries))
        return str(out)

    first = run_dir("first", [1, 1, 0, 1], ["11", "22", "33", "44"])
    second = run_dir("second", [0, 1, 0, 0], ["11", "22", "33", "44"])
    assert main(["eval", "compare", first, A, A, "--b-out", second, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["a_wins"], report["b_wins"], report["prompts"]) == (2, 0, 4)
    assert report["difference"] == pytest.approx(50.0)
    assert report["b"] == f"{A} (from {second})"
    # without --b-out the same label twice is still refused
    assert main(["eval", "compare", first, A, A]) == 2
    assert "both names resolve" in capsys.readouterr().err
    other = run_dir("other", [0, 1, 0, 0], ["11", "22", "99", "44"])
    assert main(["eval", "compare", first, A, A, "--b-out", other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed 2: the two runs asked different prompts" in err[0], err
