"""The accuracy–cost frontier: every method over a grid of budgets, on the RULER task families.

Why: one operating point (R_struct 0.2, R_KV 0.1) says little about a method a user must size
for their model. The frontier shows accuracy as a function of the prefill compute fraction (what
the propagation saves) and of the KV fraction (what the cache keeps), per task family, and
names per method the cheapest setting that keeps >= 90 % of full context's score.

A setting is a method with knobs, labelled ``method rs=0.2 kv=0.1``; the RULER runner scores it
like any method (resumable ``results.json``; the methods of one prompt share their full-length
layers), recording the compute fraction each prefill measured. ``frontier.md`` / ``frontier.json``
and two figures per length are written from the results alone (``--report-only`` rewrites them).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from structkv.eval.runner import RunConfig, _key, load_results, run_ruler
from structkv.methods import METHODS

R_STRUCTS = (0.1, 0.2, 0.3, 0.5, 0.7)
R_KVS = (0.05, 0.1, 0.2, 0.5)
#: Task families (RULER's categories): a method may hold single needles and lose aggregation.
FAMILIES = {
    "single needle": ("niah_single_1", "niah_single_2", "niah_single_3"),
    "multi needle": (
        "niah_multikey_1",
        "niah_multikey_2",
        "niah_multikey_3",
        "niah_multivalue",
        "niah_multiquery",
    ),
    "tracing": ("vt",),
    "aggregation": ("cwe", "fwe"),
}
#: RULER's needle average (mean over the ``niah_*`` tasks run, each task weighing the same): the
#: figure the issue's goals are stated in, reported beside the families and given a cheapest
#: setting of its own.
NEEDLE_AVERAGE = "needle average"
#: A setting "keeps" a family when it scores at least this share of full context's score.
KEEP = 0.9
PROFILES = {
    "quick": dict(
        methods="full,snapkv,structkv",
        tasks="niah_single_1,vt",
        lengths="512",
        samples=2,
        r_structs="0.2,0.5",
        r_kvs="0.1,0.5",
    ),
    "full": dict(
        methods="full,snapkv,pyramidkv,gemfilter,fastkv,structkv",
        tasks=",".join(t for fam in FAMILIES.values() for t in fam),
        lengths="2048,4096",
        samples=20,
        r_structs=",".join(map(str, R_STRUCTS)),
        r_kvs=",".join(map(str, R_KVS)),
    ),
}


def settings(methods: list[str], r_structs, r_kvs, knobs: dict | None = None) -> dict:
    """``label -> (method, knobs)``: every budget pair a method has (R_struct x R_KV for the
    propagating methods, R_KV for cache-only ones, one point for full); ``knobs`` (window,
    chunk, ...) apply to all."""
    out = {}
    base = {k: v for k, v in (knobs or {}).items() if v is not None}
    for m in methods:
        names = METHODS[m].knobs()
        own = {k: v for k, v in base.items() if k in names}
        if "r_struct" in names:
            for rs in r_structs:
                for rk in r_kvs if "r_kv" in names else (None,):
                    label = f"{m} rs={rs}" + ("" if rk is None else f" kv={rk}")
                    if own.get("refine_layer") is not None:  # a second budget, deeper
                        label += f" ref={own['refine_layer']}:{own.get('r_refine')}"
                    budgets = {"r_struct": rs} if rk is None else {"r_struct": rs, "r_kv": rk}
                    out[label] = (m, {**own, **budgets})
        elif "r_kv" in names:
            for rk in r_kvs:
                out[f"{m} kv={rk}"] = (m, {**own, "r_kv": rk})
        else:
            out[m] = (m, own)
    return out


def _family_scores(results: dict, cfg: RunConfig, label: str, n: int) -> dict[str, float]:
    """Mean score (0–1) per family over its tasks in ``cfg.tasks``; only complete families."""
    out = {}
    for fam, tasks in FAMILIES.items():
        tasks = [t for t in tasks if t in cfg.tasks]
        scores = []
        for t in tasks:
            for i in range(cfg.samples):
                e = results.get(_key(label, t, n, cfg.seed + i))
                if e is None or e.get("score") is None:
                    break
                scores.append(e["score"])
        if tasks and len(scores) == len(tasks) * cfg.samples:
            out[fam] = statistics.mean(scores)
    means = _task_means(results, cfg, label, n)
    needles = [t for t in cfg.tasks if t.startswith("niah_")]
    if len(needles) > 1 and all(t in means for t in needles):
        out[NEEDLE_AVERAGE] = statistics.mean(means[t] for t in needles)
    return out


def _task_means(results: dict, cfg: RunConfig, label: str, n: int) -> dict[str, float]:
    """Mean score per task over its samples; complete tasks only."""
    out = {}
    for t in cfg.tasks:
        entries = [results.get(_key(label, t, n, cfg.seed + i)) for i in range(cfg.samples)]
        if all(e is not None and e.get("score") is not None for e in entries):
            out[t] = statistics.mean(e["score"] for e in entries)
    return out


def _cost(results: dict, cfg: RunConfig, label: str, n: int) -> float | None:
    fracs = [
        e["compute_fraction"]
        for t in cfg.tasks
        for i in range(cfg.samples)
        if (e := results.get(_key(label, t, n, cfg.seed + i))) and "compute_fraction" in e
    ]
    return statistics.mean(fracs) if fracs else None


def summarise(results: dict, cfg: RunConfig, specs: dict) -> dict:
    """Per length: every setting's measured compute fraction, KV fraction and family scores;
    per method and family the cheapest setting keeping >= KEEP of full (compute first, then
    KV), or None when no setting does."""
    out = {}
    for n in cfg.lengths:
        rows = []
        for label, (method, knobs) in specs.items():
            scores = _family_scores(results, cfg, label, n)
            if not scores:
                continue
            cost = _cost(results, cfg, label, n)
            rows.append({"setting": label, "method": method, "r_struct": knobs.get("r_struct"),
                         "r_kv": knobs.get("r_kv", 1.0), "compute_fraction": cost,
                         "scores": scores})  # fmt: skip
        full = next((r["scores"] for r in rows if r["method"] == "full"), None)
        cheapest: dict[str, dict[str, str | None]] = {}
        if full:
            for r in rows:
                r["pct_full"] = {f: (100 * s / full[f] if full.get(f) else None)
                                 for f, s in r["scores"].items()}  # fmt: skip
            for m in dict.fromkeys(r["method"] for r in rows):
                cheapest[m] = {}
                for fam, ref in full.items():
                    ok = [r for r in rows if r["method"] == m and fam in r["scores"]
                          and r["scores"][fam] >= KEEP * ref]  # fmt: skip
                    best = min(ok, key=lambda r: (r["compute_fraction"] or 1.0, r["r_kv"]),
                               default=None)  # fmt: skip
                    cheapest[m][fam] = best["setting"] if best else None
        out[str(n)] = {"rows": rows, "cheapest": cheapest, "full": full}
    return out


def report_markdown(summary: dict, cfg: RunConfig, speed: dict | None = None) -> str:
    fams = [f for f in FAMILIES if any(t in cfg.tasks for t in FAMILIES[f])]
    if any(NEEDLE_AVERAGE in r["scores"] for d in summary.values() for r in d["rows"]):
        fams.append(NEEDLE_AVERAGE)
    parts = [f"# Frontier: {cfg.samples} samples per task, tasks {', '.join(cfg.tasks)}\n"]
    for n, data in summary.items():
        head = ["setting", "compute", "KV", *fams]
        lines = [f"\n## {n} tokens\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in data["rows"]:
            cost = "–" if r["compute_fraction"] is None else f"{r['compute_fraction']:.3f}"
            cells = []
            for f in fams:
                s = r["scores"].get(f)
                pct = (r.get("pct_full") or {}).get(f)
                cells.append("–" if s is None else f"{100 * s:.1f}"
                             + ("" if pct is None else f" ({pct:.0f} %)"))  # fmt: skip
            lines.append("| " + " | ".join([r["setting"], cost, str(r["r_kv"]), *cells]) + " |")
        parts.append("\n".join(lines) + "\n")
        if data["cheapest"]:
            lines = [
                f"\nCheapest setting keeping >= {KEEP:.0%} of full, per family "
                "(least compute, then least KV):\n",
                "| method | " + " | ".join(fams) + " |",
                "|---|" + "---|" * len(fams),
            ]
            for m, per in data["cheapest"].items():
                lines.append(f"| {m} | " + " | ".join(per.get(f) or "none" for f in fams) + " |")
            parts.append("\n".join(lines) + "\n")
    if speed:
        lines = ["\n## Measured prefill speedup at the cheapest settings\n",
                 "| setting | length | median s | speedup vs full (paired) | compute fraction |",
                 "|---|---|---|---|---|"]  # fmt: skip
        for row in speed:
            lines.append(f"| {row['setting']} | {row['length']} | {row['median_s']} | "
                         f"{row['speedup_vs_full']} | {row['compute_fraction']} |")  # fmt: skip
        parts.append("\n".join(lines) + "\n")
    return "".join(parts)


def plot_frontier(summary: dict, cfg: RunConfig, out: Path) -> list[Path]:
    """Per length: accuracy vs compute fraction (per family; one line per method: its best
    accuracy at each compute level over the KV budgets) and accuracy vs KV fraction (one line
    per method at its smallest R_struct >= 0.2, cache-only methods as they are)."""
    from structkv.eval.plots import _save, plt

    paths = []
    fams = [f for f in FAMILIES if any(t in cfg.tasks for t in FAMILIES[f])]
    for n, data in summary.items():
        rows = data["rows"]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        for kind in ("compute", "kv"):
            fig, axes = plt.subplots(1, len(fams), figsize=(4.2 * len(fams), 3.6), squeeze=False)
            for ax, fam in zip(axes[0], fams):
                ref = (data["full"] or {}).get(fam)
                if ref is not None:  # full context: the level every method is measured against
                    ax.axhline(ref, color="black", linestyle="--", linewidth=1, label="full")
                for m in methods:
                    if m == "full":
                        continue
                    mine = [r for r in rows if r["method"] == m and fam in r["scores"]]
                    if kind == "compute":
                        best: dict[float, float] = {}
                        for r in mine:
                            x = round(r["compute_fraction"] or 1.0, 2)
                            best[x] = max(best.get(x, 0.0), r["scores"][fam])
                        pts = sorted(best.items())
                    else:
                        rs = sorted({r["r_struct"] for r in mine if r["r_struct"] is not None})
                        pick = next((x for x in rs if x >= 0.2), rs[-1] if rs else None)
                        pts = sorted((r["r_kv"], r["scores"][fam]) for r in mine
                                     if r["r_struct"] == pick)  # fmt: skip
                        if pick is not None:
                            m = f"{m} (rs={pick})"
                    if pts:
                        xs, ys = zip(*pts)
                        ax.plot(xs, ys, marker="o", label=m)
                ax.set_title(fam)
                ax.set_xlabel("prefill compute fraction" if kind == "compute" else "KV fraction")
                ax.set_ylim(-0.05, 1.05)
            axes[0][0].set_ylabel("accuracy")
            axes[0][-1].legend(fontsize=7)
            fig.suptitle(f"{n} tokens")
            paths.append(_save(fig, out / f"frontier-{kind}-{n}.png"))
    return paths


def run_frontier(lm, cfg: RunConfig, specs: dict, out: Path, progress=None,
                 speed_repeats: int = 0, timer=None) -> dict:  # fmt: skip
    """Score every setting (resumable), then write frontier.json / .md and the figures. With
    ``speed_repeats``, the cheapest settings' prefill is timed against full at the longest
    length by ``timer(lm, instances, length, repeats)`` (the CLI passes the benchmark's paired
    medians, :func:`structkv.bench.bench_prefill`, a front end this package does not import)."""
    if lm is not None:
        run_ruler(lm, cfg, out, progress=progress)
    results = load_results(out)
    summary = summarise(results, cfg, specs)
    speed = None
    if lm is not None and speed_repeats and timer is not None:
        speed = measure_speed(lm, summary, specs, max(cfg.lengths), speed_repeats, timer)
    elif lm is None and (out / "frontier.json").is_file():  # --report-only keeps the timings
        speed = json.loads((out / "frontier.json").read_text()).get("speed")
    doc = {"config": {"tasks": cfg.tasks, "lengths": cfg.lengths, "samples": cfg.samples,
                      "seed": cfg.seed, "settings": specs}, "summary": summary,
           "speed": speed}  # fmt: skip
    (out / "frontier.json").write_text(json.dumps(doc, indent=1))
    (out / "frontier.md").write_text(report_markdown(summary, cfg, speed))
    plot_frontier(summary, cfg, out)
    return doc


def measure_speed(lm, summary: dict, specs: dict, length: int, repeats: int, timer) -> list:
    """The cheapest settings (and full) configured for ``lm``, timed by ``timer``."""
    from structkv.generate import as_method

    chosen = {s for per in summary[str(length)]["cheapest"].values() for s in per.values() if s}
    instances = {"full": as_method("full", lm.model_id)}
    for label in sorted(chosen - {"full"}):
        method, knobs = specs[label]
        instances[label] = as_method(method, lm.model_id, **knobs)
    rows = timer(lm, instances, length, repeats)
    return [{"setting": r["method"], "length": r["length"], "median_s": r["median_s"],
             "speedup_vs_full": r["speedup_vs_full"], "compute_fraction": r["compute_fraction"]}
            for r in rows]  # fmt: skip
