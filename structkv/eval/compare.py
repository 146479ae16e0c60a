"""Paired comparison of two methods' answers (``structkv eval compare``): one results.json, or
B from another run of the same prompts (``--b-out``).

Every RULER cell here has 20 prompts at most, so one prompt moves a cell by 5 points and a
frontier claim like "StructKV ≥ GemFilter at compute 0.55" can rest on two or three prompts.
Both methods answered the *same* prompts (same task, length and seed), so the honest test is
paired: per cell, how many prompts each method won; over all prompts where the scores differ,
a two-sided sign test; and a bootstrap interval of the difference of the averages, resampling
prompts within each cell (cells are what the reports average). Pure Python on the saved
answers: nothing is generated, so it runs anywhere in a second.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from structkv.errors import StructKVError

#: Bootstrap resamples and their seed: fixed, so a report is reproducible to the digit.
RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass
class Cell:
    """One (task, length): the paired scores of the prompts both methods answered."""

    task: str
    length: int
    a: list[float]
    b: list[float]

    @property
    def wins(self) -> tuple[int, int]:
        return (
            sum(x > y for x, y in zip(self.a, self.b, strict=True)),
            sum(y > x for x, y in zip(self.a, self.b, strict=True)),
        )


def resolve_label(results: dict, name: str) -> str:
    """A label as the reports write it ("structkv rs=0.2 kv=0.1"), or a method name that names
    exactly one label (the frontier's labels carry the budgets; typing them is error-prone)."""
    labels = sorted({key.split("|", 1)[0] for key in results})
    if name in labels:
        return name
    matches = [label for label in labels if label.split(" ", 1)[0] == name]
    if len(matches) == 1:
        return matches[0]
    listed = ", ".join(repr(label) for label in labels) or "none"
    if matches:
        raise StructKVError(
            f"{name!r} names {len(matches)} labels here ({', '.join(map(repr, matches))}); "
            "pass the whole label in quotes"
        )
    raise StructKVError(f"no answers labelled {name!r} in this results.json; labels: {listed}")


def paired_cells(
    results: dict, a: str, b: str, tasks: list[str] | None = None, b_results: dict | None = None
) -> list[Cell]:
    """The cells both labels answered, paired by seed; answers with an error (no score) on
    either side are left out of both, so the pairs stay pairs. ``b_results``: B's answers from
    another run (default: the same one). Two runs pair only where they asked the same prompt,
    which the saved expected answers witness (a task's needles are drawn from its seed): a
    differing one is an error, not a silent mismatch."""
    other_run = results if b_results is None else b_results
    cells: dict[tuple[str, int], Cell] = {}
    for key, entry in results.items():
        label, task, length, seed = key.rsplit("|", 3)
        if label != a or (tasks and task not in tasks):
            continue
        other = other_run.get(f"{b}|{task}|{length}|{seed}")
        if "score" not in entry or not other or "score" not in other:
            continue
        if b_results is not None and entry.get("answers") != other.get("answers"):
            raise StructKVError(
                f"{task} at {length} tokens, seed {seed}: the two runs asked different prompts "
                f"(expected answers {entry.get('answers')} vs {other.get('answers')}); compare "
                "runs of the same eval version, tasks and seeds"
            )
        cell = cells.setdefault((task, int(length)), Cell(task, int(length), [], []))
        cell.a.append(float(entry["score"]))
        cell.b.append(float(other["score"]))
    if not cells:
        raise StructKVError(
            f"{a!r} and {b!r} answered no prompt in common"
            + (f" on tasks {','.join(tasks)}" if tasks else "")
            + "; compare labels of one run (same tasks, lengths and seeds)"
        )
    return [cells[k] for k in sorted(cells, key=lambda k: (k[1], k[0]))]


def sign_test(wins_a: int, wins_b: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven if neither method
    is better (ties, the prompts both got equally right or wrong, carry no evidence)."""
    n = wins_a + wins_b
    if n == 0:
        return 1.0
    k = min(wins_a, wins_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def average(cells: list[Cell], side: str) -> float:
    """Mean over cells of each cell's mean score, in percent — how results.md averages."""
    return 100 * sum(sum(getattr(c, side)) / len(getattr(c, side)) for c in cells) / len(cells)


def bootstrap_interval(
    cells: list[Cell], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """95 % percentile interval of average(a) - average(b), resampling each cell's prompts
    with replacement (pairs kept together)."""
    rng = random.Random(seed)
    diffs = []
    for _ in range(resamples):
        total = 0.0
        for c in cells:
            n = len(c.a)
            picks = [rng.randrange(n) for _ in range(n)]
            total += sum(c.a[i] - c.b[i] for i in picks) / n
        diffs.append(100 * total / len(cells))
    diffs.sort()
    lo = diffs[int(0.025 * (resamples - 1))]
    hi = diffs[math.ceil(0.975 * (resamples - 1))]
    return lo, hi


def compare(
    results: dict, a: str, b: str, tasks: list[str] | None = None, b_results: dict | None = None
) -> dict:
    """Everything the report prints, as one dict (``--json``). ``b_results``: take B from
    another run's answers (``--b-out``), e.g. the same label run with other knobs."""
    a = resolve_label(results, a)
    b = resolve_label(results if b_results is None else b_results, b)
    if a == b and b_results is None:
        raise StructKVError(f"both names resolve to {a!r}; compare two different labels")
    cells = paired_cells(results, a, b, tasks, b_results)
    wins_a = sum(c.wins[0] for c in cells)
    wins_b = sum(c.wins[1] for c in cells)
    lo, hi = bootstrap_interval(cells)
    return {
        "a": a,
        "b": b,
        "prompts": sum(len(c.a) for c in cells),
        "cells": [
            {
                "task": c.task,
                "length": c.length,
                "n": len(c.a),
                "a": round(100 * sum(c.a) / len(c.a), 1),
                "b": round(100 * sum(c.b) / len(c.b), 1),
                "a_wins": c.wins[0],
                "b_wins": c.wins[1],
            }
            for c in cells
        ],
        "average_a": round(average(cells, "a"), 2),
        "average_b": round(average(cells, "b"), 2),
        "difference": round(average(cells, "a") - average(cells, "b"), 2),
        "interval95": [round(lo, 2), round(hi, 2)],
        "a_wins": wins_a,
        "b_wins": wins_b,
        "sign_test_p": round(sign_test(wins_a, wins_b), 4),
    }


def format_report(report: dict) -> str:
    a, b = report["a"], report["b"]
    lines = [
        f"A = {a}, B = {b}: {report['prompts']} prompts answered by both",
        "",
        "| task | length | n | A | B | A better | B better |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in report["cells"]:
        lines.append(
            f"| {c['task']} | {c['length']} | {c['n']} | {c['a']} | {c['b']} | {c['a_wins']} "
            f"| {c['b_wins']} |"
        )
    lo, hi = report["interval95"]
    lines += [
        "",
        f"average A {report['average_a']:.2f}, B {report['average_b']:.2f}: A - B = "
        f"{report['difference']:+.2f} points (95 % bootstrap interval {lo:+.2f} to {hi:+.2f})",
        f"prompts scored differently: A better on {report['a_wins']}, B better on "
        f"{report['b_wins']}; two-sided sign test p = {report['sign_test_p']:.4f}",
    ]
    return "\n".join(lines) + "\n"


def load(path: Path) -> dict:
    """results.json from a run directory or the file itself; one clear error otherwise."""
    file = path / "results.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise StructKVError(
            f"{file} does not exist; pass an eval --out directory (or its results.json)"
        ) from None
    except OSError as e:
        raise StructKVError(f"cannot read {file} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise StructKVError(f"{file} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict) or any(key.count("|") < 3 for key in data):
        raise StructKVError(f"{file} is not an eval results.json (method|task|length|seed keys)")
    return data
