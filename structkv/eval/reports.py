"""The analysis reports behind `structkv eval {niah,fidelity,pivot,latency}`: JSON + PNG each.

All prompts come from :mod:`structkv.eval.ruler` (deterministic from the seed); every report
writes ``<kind>.json`` and ``<kind>*.png`` into the output directory.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from structkv.eval import plots
from structkv.eval.fidelity import fidelity
from structkv.eval.ruler import make_sample, score
from structkv.generate import as_method, encode_prompt, eos_token_ids, generate_ids
from structkv.methods import METHODS, SnapKV
from structkv.pivot import OnlinePivot, offline_pivot, search_range, transition_scores
from structkv.profile import find_profile


def _ids(lm, task: str, length: int, seed: int, depth: float | None = None) -> torch.Tensor:
    sample = make_sample(task, lm.tokenizer, length, seed, depth=depth)
    chat = bool(getattr(lm.tokenizer, "chat_template", None))
    return encode_prompt(lm.tokenizer, sample.prompt, chat)


def _write(out: Path, name: str, data: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(data, indent=1))
    return path


@torch.inference_mode()
def pivot_report(lm, out: Path, length: int, samples: int, seed: int = 0, task="niah_single_2"):
    """Per-layer entropy / sparsity / variance / T_l on full-length layers, pivots per prompt
    by both rules (offline, and online with the profile's scales), and the profile's choice."""
    num_layers = len(lm.model.model.layers)
    l_min, l_max = search_range(num_layers)
    profile = find_profile(lm.model_id)
    scales = tuple(profile["metric_scales"]) if profile else None
    per_prompt, curves = [], {"entropy": [], "sparsity": [], "variance": [], "transition": []}
    for i in range(samples):
        stats = SnapKV().prefill(lm.model, _ids(lm, task, length, seed + i)).stats
        metrics = list(zip(stats.entropy, stats.sparsity, stats.variance))
        t = transition_scores(metrics)
        online = OnlinePivot(l_min, l_max, scales=scales)
        decided = next((p for m in metrics if (p := online.observe(m)) is not None), l_max)
        per_prompt.append(
            {
                "seed": seed + i,
                "argmax": offline_pivot(t, l_min, l_max, "argmax"),
                "stabilised": offline_pivot(t, l_min, l_max, "stabilised"),
                "online_argmax": decided,
                "transition": t,
            }
        )
        for key, values in (
            ("entropy", stats.entropy),
            ("sparsity", stats.sparsity),
            ("variance", stats.variance),
            ("transition", t),
        ):
            curves[key].append(values)
    mean = {k: [statistics.mean(col) for col in zip(*v)] for k, v in curves.items()}
    chosen = profile["pivot"] if profile else None
    data = {
        "model": lm.model_id,
        "length": length,
        "task": task,
        "search_range": [l_min, l_max],
        "profile_pivot": chosen,
        "profile_lambda": profile["lambda"] if profile else None,
        "mean": mean,
        "prompts": per_prompt,
    }
    _write(out, "pivot.json", data)
    pivot = chosen if isinstance(chosen, int) else per_prompt[0]["argmax"]
    plots.plot_pivot(
        mean["entropy"], mean["sparsity"], mean["variance"], mean["transition"], pivot,
        out / "pivot.png", title=f"{lm.model_id}: pivot metrics, L* = {pivot}",
    )  # fmt: skip
    return data


@torch.inference_mode()
def fidelity_report(lm, methods: list[str], out: Path, length: int, samples: int, seed=0):
    """Mean per-layer last-token cosine, KL and top-1 agreement vs full, per method."""
    resolved = [as_method(m, lm.model_id) for m in methods if m != "full"]
    rows = {m.name: [] for m in resolved}
    for i in range(samples):
        for f in fidelity(lm.model, _ids(lm, "niah_single_2", length, seed + i), resolved):
            rows[f.method].append(f)
    data = {
        name: {
            "layer_cosine": [statistics.mean(c) for c in zip(*(f.layer_cosine for f in fs))],
            "kl": statistics.mean(f.kl for f in fs),
            "top1_agreement": statistics.mean(f.top1_agreement for f in fs),
        }
        for name, fs in rows.items()
    }
    _write(out, "fidelity.json", {"model": lm.model_id, "length": length, "methods": data})
    plots.plot_fidelity(
        {k: v["layer_cosine"] for k, v in data.items()}, out / "fidelity.png",
        title=f"{lm.model_id}: hidden-state fidelity at {length} tokens",
    )  # fmt: skip
    return data


STAGES = {
    "pre-pivot layers": ("layers_full",),
    "centrality + pivot": ("pivot_metrics", "centrality_pivot"),
    "saliency": ("saliency",),
    "compaction": ("compaction",),
    "post-pivot layers": ("layers_compacted",),
    "KV selection": ("kv_select",),
}


@torch.inference_mode()
def latency_report(lm, methods: list[str], out: Path, length: int, repeats: int = 3, seed=0):
    """Median seconds per prefill stage and method (paper Figure 8), after one warm-up."""
    ids = _ids(lm, "niah_single_2", length, seed)
    resolved = {m: as_method(m, lm.model_id) for m in methods}
    runs = {m: [] for m in methods}
    for rnd in range(repeats + 1):
        for name, method in resolved.items():
            stats = method.prefill(lm.model, ids).stats
            if rnd:
                runs[name].append(stats.timings)
    breakdown = {
        name: {
            stage: statistics.median(sum(t.get(k, 0.0) for k in keys) for t in timings)
            for stage, keys in STAGES.items()
        }
        for name, timings in runs.items()
        if name != "gemfilter"  # its two passes are not layer stages; see its own timings
    }
    _write(out, "latency.json", {"model": lm.model_id, "tokens": len(ids), "stages": breakdown})
    plots.plot_latency(
        breakdown, out / "latency.png", title=f"{lm.model_id}: prefill at {len(ids)} tokens"
    )
    return breakdown


def _accuracy(lm, method, task, length, samples, seed, depth=None) -> tuple[float, list]:
    """Mean score over ``samples`` prompts, and the generations (for survival diagnostics)."""
    eos = eos_token_ids(lm)
    chat = bool(getattr(lm.tokenizer, "chat_template", None))
    scores, gens = [], []
    for i in range(samples):
        sample = make_sample(task, lm.tokenizer, length, seed + i, depth=depth)
        ids = encode_prompt(lm.tokenizer, sample.prompt, chat)
        gen = generate_ids(lm.model, ids, method, 32, eos_ids=eos)
        scores.append(score(sample, lm.tokenizer.decode(gen.tokens, skip_special_tokens=True)))
        gens.append((sample, ids, gen))
    return statistics.mean(scores), gens


@torch.inference_mode()
def niah_report(lm, methods, out: Path, lengths, depths, samples, seed=0, task="niah_single_2"):
    """Accuracy grid over lengths x depths per method (paper Figure 6), JSON + heatmaps."""
    data = {}
    for name in methods:
        method = as_method(name, lm.model_id)
        grid = {
            (n, d): _accuracy(lm, method, task, n, samples, seed, depth=d)[0]
            for n in lengths
            for d in depths
        }
        data[name] = {f"{n}@{d}": v for (n, d), v in grid.items()}
        plots.plot_grid(
            grid, out / f"niah-{name}.png", "context tokens", "needle depth", f"{name}: {task}"
        )
    _write(out, "niah.json", {"model": lm.model_id, "task": task, "grid": data})
    return data


def _survival(lm, sample, ids, gen) -> dict:
    """Fraction of the needle values' tokens kept: in the propagated set, and per layer in KV
    (mean over KV heads). GemFilter's KV positions are mapped back to the prompt."""
    ids = ids.tolist()
    needle = set()
    for answer in sample.answers:
        target = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
        for i in range(len(ids) - len(target) + 1):
            if ids[i : i + len(target)] == target:
                needle.update(range(i, i + len(target)))
    if not needle:
        return {"propagated": None, "kv_per_layer": []}
    stats = gen.stats
    original = stats.propagated_positions if stats.method == "gemfilter" else None
    propagated = set(stats.propagated_positions or range(len(ids)))
    per_layer = []
    for layer in gen.cache.layers:
        heads = []
        for head in layer.kept_positions().tolist():
            kept = {original[p] for p in head if p < len(original)} if original else set(head)
            heads.append(len(needle & kept) / len(needle))
        per_layer.append(statistics.mean(heads))
    return {"propagated": len(needle & propagated) / len(needle), "kv_per_layer": per_layer}


def _survival_table(
    lm, methods, task: str, length: int, samples: int, seed: int, knobs: dict | None = None
) -> dict:
    """Per method: accuracy, mean needle survival in the propagated set, and per layer in KV.
    ``knobs`` (window, r_kv, ...) go to each method that has them, as the frontier gives them."""
    table = {}
    for name in methods:
        own = {k: v for k, v in (knobs or {}).items() if k in METHODS[name].knobs()}
        method = as_method(name, lm.model_id, **own)
        acc, gens = _accuracy(lm, method, task, length, samples, seed)
        rows = [_survival(lm, *g) for g in gens]
        kept = [r["propagated"] for r in rows if r["propagated"] is not None]
        layers = [r["kv_per_layer"] for r in rows if r["kv_per_layer"]]
        table[name] = {
            "accuracy": acc,
            "propagated": statistics.mean(kept) if kept else None,
            "propagated_per_sample": [r["propagated"] for r in rows],
            "kv_per_layer": [statistics.mean(c) for c in zip(*layers)] if layers else [],
        }
    return table


@torch.inference_mode()
def survival_report(
    lm, methods, out: Path, lengths, samples: int, seed=0, task="niah_single_1", knobs=None
):
    """Needle survival per stage (propagated set, each layer's KV) and accuracy, per length and
    method: explains a needle-task score without touching the method (issue 3, item 5), e.g.
    which layers' caches lose a needle the propagated set still holds at a smaller R_KV."""
    data = {n: _survival_table(lm, methods, task, n, samples, seed, knobs) for n in lengths}
    _write(out, "survival.json", {"model": lm.model_id, "task": task, "samples": samples,
                                  "seed": seed, "knobs": knobs or {}, "lengths": data})  # fmt: skip
    return data


@torch.inference_mode()
def decoupling_report(
    lm, out: Path, length: int, samples: int, seed: int = 0, task: str = "niah_single_1",
    r_structs=(0.1, 0.2, 0.3, 0.5), r_kvs=(0.1, 0.25, 0.5),
    lambdas=(0.1, 0.3, 0.5, 0.9), pivots=None, methods=(),
):  # fmt: skip
    """Accuracy over R_struct x R_KV (paper Figure 7), over λ x pivot layer for StructKV, and
    needle survival per stage for each of ``methods`` at the default budgets."""
    base = as_method("structkv", lm.model_id)

    def grid(methods: dict) -> dict:
        return {k: _accuracy(lm, m, task, length, samples, seed)[0] for k, m in methods.items()}

    budgets = grid(
        {(rs, rk): replace(base, r_struct=rs, r_kv=rk) for rs in r_structs for rk in r_kvs}
    )
    plots.plot_grid(budgets, out / "decoupling.png", "R_struct", "R_KV", f"structkv: {task}")
    num_layers = len(lm.model.model.layers)
    pivots = pivots or range(search_range(num_layers)[0], search_range(num_layers)[1] + 1, 2)
    sweep = grid({(p, lam): replace(base, lam=lam, pivot=p) for lam in lambdas for p in pivots})
    plots.plot_grid(sweep, out / "lambda-pivot.png", "pivot layer", "λ", f"structkv: {task}")
    survival = _survival_table(lm, methods, task, length, samples, seed)
    data = {
        "model": lm.model_id,
        "task": task,
        "length": length,
        "samples": samples,
        "budgets": {f"{rs}/{rk}": v for (rs, rk), v in budgets.items()},
        "lambda_pivot": {f"{lam}@{p}": v for (p, lam), v in sweep.items()},
        "survival": survival,
    }
    _write(out, "decoupling.json", data)
    return data
