"""Resumable evaluation runs: every scored sample is saved at once, so a re-run skips it.

``results.json`` maps ``method|task|length|seed`` to the score, the output and any error; errors
are counted and shown in ``results.md``, never dropped. The Markdown table is method x task x
length, with each method's average and its percentage of full context's average.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from structkv.errors import StructKVError
from structkv.eval.ruler import TASKS, make_sample, score
from structkv.generate import (
    as_method,
    encode_prompt,
    eos_token_ids,
    generate_ids,
    generate_many,
)
from structkv.paths import write_json_atomic

#: ``--profile quick`` (CI-sized, < 3 minutes on 2 cores) and ``--profile full`` (the report).
PROFILES = {
    "quick": dict(
        methods="full,snapkv,structkv", tasks="niah_single_1,vt", lengths="512", samples=2
    ),
    "full": dict(
        methods="full,streamingllm,snapkv,pyramidkv,gemfilter,fastkv,structkv-paper,structkv",
        tasks=",".join(TASKS),
        lengths="1024,2048,4096",
        samples=20,
    ),
}


@dataclass
class RunConfig:
    methods: list[str]
    tasks: list[str]
    lengths: list[int]
    samples: int
    seed: int = 0
    max_new_tokens: int = 32
    knobs: dict | None = None
    haystack_file: str | None = None
    #: label -> (method, knobs) for labels that are not plain method names (the frontier's
    #: budget settings); their knobs override ``knobs``.
    specs: dict | None = None


def _key(method: str, task: str, length: int, seed: int) -> str:
    return f"{method}|{task}|{length}|{seed}"


def _save_json(path: Path, data: dict) -> None:
    write_json_atomic(path, data)


def load_results(out_dir: Path) -> dict:
    """What a run has scored so far (``out_dir/results.json``), or nothing."""
    path = out_dir / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _todo(cfg: RunConfig, results: dict) -> list[tuple[str, int, int, list[str]]]:
    """(task, length, seed, methods not yet scored). Length-major, then sample: a stopped run
    leaves whole (task, length) cells for all methods, and the methods of one prompt share
    their full-length prefill layers."""
    todo = []
    for n in cfg.lengths:
        for t in cfg.tasks:
            for i in range(cfg.samples):
                missing = [m for m in cfg.methods if _key(m, t, n, cfg.seed + i) not in results]
                if missing:
                    todo.append((t, n, cfg.seed + i, missing))
    return todo


def _check_same_config(results: dict, name: str, config: dict, out_dir: Path) -> None:
    """Resuming must not mix answers of two configurations under one name (a recalibrated
    profile or other knobs change what ``structkv`` means)."""
    for key, entry in results.items():
        if key.split("|", 1)[0] == name and "method" in entry:
            if entry["method"] != config:
                raise StructKVError(
                    f"{out_dir / 'results.json'} holds {name} answers made with {entry['method']}"
                    f", but {name} now resolves to {config} (another profile or knobs); use a "
                    "new --out, or the knobs of that run"
                )
            return


def run_ruler(lm, cfg: RunConfig, out_dir: Path, progress=None) -> dict:
    """Score every (method, task, length, sample) not already in ``out_dir/results.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    results = load_results(out_dir)
    chat = bool(getattr(lm.tokenizer, "chat_template", None))
    eos = eos_token_ids(lm)
    todo = _todo(cfg, results)
    bar = progress(total=sum(len(m) for *_, m in todo)) if progress else None
    methods = {}
    for task, length, seed, names in todo:
        for name in names:
            if name not in methods:
                knobs = {k: v for k, v in (cfg.knobs or {}).items() if v is not None}
                method, own = (cfg.specs or {}).get(name, (name, {}))
                methods[name] = as_method(method, lm.model_id, **{**knobs, **own})
                _check_same_config(results, name, methods[name].to_dict(), out_dir)
        sample = make_sample(task, lm.tokenizer, length, seed, cfg.haystack_file)
        start = time.perf_counter()
        ids = encode_prompt(lm.tokenizer, sample.prompt, chat)
        try:
            gens = generate_many(
                lm.model, ids, [methods[m] for m in names], cfg.max_new_tokens, eos_ids=eos
            )
        except Exception:  # find out which method fails: run each alone below
            gens = [None] * len(names)
        group_s = round(time.perf_counter() - start, 3)
        for name, gen in zip(names, gens, strict=True):
            entry = {"answers": sample.answers, "group_seconds": group_s}
            try:
                if gen is None:
                    gen = generate_ids(
                        lm.model, ids, methods[name], cfg.max_new_tokens, eos_ids=eos
                    )
                text = lm.tokenizer.decode(gen.tokens, skip_special_tokens=True)
                entry.update(
                    score=score(sample, text),
                    output=text,
                    prompt_tokens=int(ids.shape[0]),
                    method=methods[name].to_dict(),
                    pivot_layer=gen.stats.pivot_layer,
                    compute_fraction=round(gen.stats.compute_fraction, 4),
                    prefill_s=round(gen.stats.prefill_s, 3),
                    decode_s=round(gen.decode_s, 3),
                )
            except Exception as e:  # counted and shown in results.md, never dropped silently
                entry.update(score=None, error=f"{type(e).__name__}: {e}")
            results[_key(name, task, length, seed)] = entry
            if bar:
                bar.update(1)
        _save_json(path, results)
        # The table too, so a stopped run (they take hours) leaves a readable report.
        (out_dir / "results.md").write_text(results_table(results, cfg))
    if bar:
        bar.close()
    (out_dir / "results.md").write_text(results_table(results, cfg))
    return results


def results_table(results: dict, cfg: RunConfig) -> str:
    """Markdown: mean score (%) per method x task x length, average, % of full, errors."""
    cols = [(t, n) for t in cfg.tasks for n in cfg.lengths]
    head = ["method", *(f"{t}@{n}" for t, n in cols), "average", "% of full", "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    averages = {}
    for m in cfg.methods:
        cells, means, errors = [], [], 0
        for t, n in cols:
            entries = [results.get(_key(m, t, n, cfg.seed + i)) for i in range(cfg.samples)]
            scored = [e["score"] for e in entries if e and e.get("score") is not None]
            errors += sum(1 for e in entries if e and e.get("error"))
            if scored:
                mean = 100 * statistics.mean(scored)
                means.append(mean)
                cells.append(f"{mean:.1f}")
            else:
                cells.append("–")
        averages[m] = statistics.mean(means) if means else None
        lines.append([m, *cells, errors])
    full = averages.get("full")
    out = lines[:2]
    for row in lines[2:]:
        m, *cells, errors = row
        avg = averages[m]
        pct = f"{100 * avg / full:.1f}" if avg is not None and full else "–"
        avg_s = f"{avg:.1f}" if avg is not None else "–"
        out.append("| " + " | ".join([m, *cells, avg_s, pct, str(errors)]) + " |")
    tables = length_tables(results, cfg) + target_table(results, cfg)
    return "\n".join(out) + "\n" + _wall_time(results) + "\n" + tables


#: Column names for the per-length tables (RULER's own abbreviations).
SHORT = {"niah_single_": "s", "niah_multikey_": "mk", "niah_multivalue": "mv",
         "niah_multiquery": "mq"}  # fmt: skip


def _short(task: str) -> str:
    for prefix, short in SHORT.items():
        if task.startswith(prefix):
            return short + task[len(prefix) :]
    return task


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _pct(value: float | None, ref: float | None) -> str:
    return "–" if value is None or not ref else f"{100 * value / ref:.1f}"


def _cell_means(results: dict, cfg: RunConfig, n: int) -> dict[str, dict[str, float | None]]:
    """Mean score (%) per method and task at length ``n``; ``None`` where a sample is missing."""
    means: dict[str, dict[str, float | None]] = {}
    for m in cfg.methods:
        row = {}
        for t in cfg.tasks:
            entries = [results.get(_key(m, t, n, cfg.seed + i)) for i in range(cfg.samples)]
            scored = [e["score"] for e in entries if e and e.get("score") is not None]
            row[t] = 100 * statistics.mean(scored) if len(scored) == cfg.samples else None
        means[m] = row
    return means


def _mean_or_none(vals: list) -> float | None:
    return statistics.mean(vals) if vals and None not in vals else None


def avg(row: dict, tasks: list[str]) -> float | None:
    return _mean_or_none([row[t] for t in tasks])


#: The issue's accuracy target is stated over these lengths (2K-4K).
TARGET_LENGTHS = (2048, 4096)


def target_table(results: dict, cfg: RunConfig, lengths=TARGET_LENGTHS) -> str:
    """Needle and all-task means pooled over ``lengths`` (every task x length cell weighs the
    same) as % of full context's same pooled mean; empty unless every cell is complete."""
    if "full" not in cfg.methods or not set(lengths) <= set(cfg.lengths):
        return ""
    needle = [t for t in cfg.tasks if t.startswith("niah_")]
    per_length = [_cell_means(results, cfg, n) for n in lengths]
    pooled = {}
    for m in cfg.methods:
        cells = [(means[m][t], t) for means in per_length for t in cfg.tasks]
        pooled[m] = [
            _mean_or_none([v for v, t in cells if t in keep]) for keep in (needle, cfg.tasks)
        ]
    full = pooled["full"]
    if None in full:
        return ""
    span = "-".join(
        f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in (min(lengths), max(lengths))
    )
    head = ["method", f"needle % full, {span}", f"all tasks % full, {span}"]
    lines = [f"\n### Pooled over {span}\n", "| " + " | ".join(head) + " |", "|---|---|---|"]
    for m, (a_needle, a_all) in pooled.items():
        lines.append(f"| {m} | {_pct(a_needle, full[0])} | {_pct(a_all, full[1])} |")
    return "\n".join(lines) + "\n"


def length_tables(results: dict, cfg: RunConfig) -> str:
    """One table per length: score (%) per task, the mean over the needle tasks (``niah_*``)
    and over all tasks, each also as % of full; only complete lengths get the means."""
    parts = []
    needle = [t for t in cfg.tasks if t.startswith("niah_")]
    for n in cfg.lengths:
        means = _cell_means(results, cfg, n)
        if not any(v is not None for row in means.values() for v in row.values()):
            continue

        full = means.get("full")
        head = ["method", *map(_short, cfg.tasks), "needle avg", "all avg", "needle % full",
                "all % full"]  # fmt: skip
        lines = [f"\n### {n} tokens\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m, row in means.items():
            a_needle, a_all = avg(row, needle), avg(row, cfg.tasks)
            f_needle = avg(full, needle) if full else None
            f_all = avg(full, cfg.tasks) if full else None
            cells = [m, *(_fmt(row[t]) for t in cfg.tasks), _fmt(a_needle), _fmt(a_all)]
            cells += [_pct(a_needle, f_needle), _pct(a_all, f_all)]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "".join(parts)


def _wall_time(results: dict) -> str:
    """Compute time of the run per length: each prompt's shared generation is counted once."""
    groups: dict[tuple, float] = {}
    for key, entry in results.items():
        _, task, length, seed = key.split("|")
        if "group_seconds" in entry:
            groups[(task, int(length), seed, entry["group_seconds"])] = entry["group_seconds"]
    per_length: dict[int, float] = {}
    for (_, length, _, _), seconds in groups.items():
        per_length[length] = per_length.get(length, 0.0) + seconds
    if not per_length:
        return ""
    parts = ", ".join(f"{n}: {s / 60:.1f} min" for n, s in sorted(per_length.items()))
    return f"\nWall time (generation only): {sum(per_length.values()) / 60:.1f} min ({parts}).\n"
