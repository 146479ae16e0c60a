"""§6 Calibration: choose the pivot (rule or layer) and λ per model by label-free fidelity.

Why: the paper's λ 0.9 and argmax pivot fail on shallow-salience models such as SmolLM2
(method.md §2–3). We pick, on generic prose prompts that are not from any evaluation task,
the (pivot, λ) whose compressed model stays closest to full context: KL of the next-token
distribution at the last prompt position, and teacher-forced greedy top-1 agreement over the
next ``steps`` tokens of the full model. Only pivots under the compute cap are searched.

Cost: one full prefill per prompt, recorded layer by layer; each candidate then re-runs only
the layers after its pivot on the compacted tokens (:func:`structkv.prefill.continue_prefill`),
since the KV selection of the layers before the pivot does not depend on the candidate.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field

import torch

from structkv.cache import LayerCache
from structkv.centrality import accumulate
from structkv.errors import StructKVError
from structkv.generate import decode_step, encode_prompt
from structkv.methods import Full, SnapKV, StructKV
from structkv.pivot import OnlinePivot, metric_scales, search_range
from structkv.prefill import Compacted, LayerView, compact, continue_prefill, run_prefill_shared
from structkv.profile import FORMAT_VERSION
from structkv.prompts.haystack import paragraphs
from structkv.prompts.needle import build_context
from structkv.selection import budget

#: Generic endings: a question or continuation about the prose itself (no needle, no lookup).
TASKS = (
    "Summarize the text above in two sentences.",
    "What is the main topic of the text above? Explain briefly.",
    "Continue the text above with one more paragraph in the same style.",
    "List the three most important ideas in the text above.",
)
LAMBDAS = (0.1, 0.3, 0.5, 0.7, 0.9)
#: The paper's operating point: prefill computation reduced by 40% (compute fraction 0.6).
DEFAULT_COMPUTE_CAP = 0.6


def calibration_prompts(tokenizer, n: int, length: int, seed: int = 1234) -> list[str]:
    """``n`` prose prompts of about ``length`` tokens, each ending with a generic task."""
    source = paragraphs()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        context = build_context(tokenizer, length - 24, rng, source)
        out.append("\n".join(context) + "\n\n" + TASKS[i % len(TASKS)])
    return out


def compute_fraction(pivot: int, num_layers: int, r_struct: float) -> float:
    """§4: (L*+1 + (L-L*-1)·R_struct) / L of the full model's linear work."""
    return (pivot + 1 + (num_layers - pivot - 1) * r_struct) / num_layers


def max_pivot_under_cap(num_layers: int, r_struct: float, cap: float) -> int:
    fits = [
        p for p in range(num_layers - 1) if compute_fraction(p, num_layers, r_struct) <= cap + 1e-9
    ]
    if not fits:
        raise StructKVError(f"no pivot fits compute cap {cap}; raise --compute-cap")
    return max(fits)


@dataclass
class _Recording:
    """Every layer's hidden state, saliency and pivot statistics of one full-length prefill,
    collected by the prefill's observer hook."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    saliency: list[torch.Tensor] = field(default_factory=list)
    metrics: list[tuple[float, float, float]] = field(default_factory=list)

    def __call__(self, view: LayerView) -> None:
        self.hidden.append(view.hidden)
        self.saliency.append(view.saliency)
        self.metrics.append(view.metrics)


@dataclass
class _PromptRun:
    ids: torch.Tensor
    record: _Recording
    caches: list[LayerCache]
    full_logprobs: torch.Tensor
    full_tokens: list[int]


def _fresh(cache: LayerCache, extra: int) -> LayerCache:
    return LayerCache.from_kept(cache.keys(), cache.values(), cache.kept_positions(), extra)


@torch.inference_mode()
def _record(model, ids, r_kv, window, pooling, steps) -> _PromptRun:
    # One pass over the layers serves both: the full model's cache and logits (the reference),
    # and SnapKV's per-layer KV selection with every layer's state recorded by the observer.
    record = _Recording()
    snap = SnapKV(r_kv=r_kv, window=window, pooling=pooling)
    full, snapped = run_prefill_shared(
        model, ids, [Full(), snap], extra_capacity=steps, observer=record
    )
    tokens = [int(full.logits.argmax())]
    for _ in range(steps - 1):
        tokens.append(int(decode_step(model, full.cache, tokens[-1]).argmax()))
    caches = snapped.cache.layers
    return _PromptRun(ids, record, caches, torch.log_softmax(full.logits, -1), tokens)


@torch.inference_mode()
def _fidelity(model, run: _PromptRun, method: StructKV, pivot: int, lam: float, steps: int):
    """(KL(full || candidate) at the last prompt position, teacher-forced top-1 agreement)."""
    n = int(run.ids.shape[0])
    c = None
    for saliency in run.record.saliency[: pivot + 1]:
        c = accumulate(c, saliency, lam)
    keep = method.select(c, budget(method.r_struct, n))
    hidden, positions = compact(run.record.hidden[pivot], torch.arange(n, device=keep.device), keep)
    caches = [_fresh(c_, steps) for c_ in run.caches[: pivot + 1]]
    out = continue_prefill(model, n, method, Compacted(pivot, hidden, positions, caches), steps)
    logprobs = torch.log_softmax(out.logits, -1)
    kl = float((run.full_logprobs.exp() * (run.full_logprobs - logprobs)).sum())
    agree = [int(out.logits.argmax()) == run.full_tokens[0]]
    for i in range(1, steps):
        logits = decode_step(model, out.cache, run.full_tokens[i - 1])
        agree.append(int(logits.argmax()) == run.full_tokens[i])
    return kl, sum(agree) / len(agree)


def _rule_pivot(metrics, l_min, l_max, rule, scales) -> int:
    online = OnlinePivot(l_min, l_max, rule=rule, scales=scales)
    for m in metrics:
        decided = online.observe(m)
        if decided is not None:
            return decided
    return l_max


def _search(model, runs, candidates, method, lambdas, steps, num_layers, progress) -> list[dict]:
    """One table row per (candidate pivot choice, λ): mean KL, top-1 agreement, compute."""
    cache: dict[tuple[int, int, float], tuple[float, float]] = {}
    table = []
    for label, pivots in candidates:
        for lam in lambdas:
            scores = []
            for i, (run, pivot) in enumerate(zip(runs, pivots)):
                key = (i, pivot, lam)
                if key not in cache:
                    cache[key] = _fidelity(model, run, method, pivot, lam, steps)
                scores.append(cache[key])
            kl = sum(s[0] for s in scores) / len(scores)
            agree = sum(s[1] for s in scores) / len(scores)
            frac = sum(compute_fraction(p, num_layers, method.r_struct) for p in pivots)
            table.append(
                {
                    "rule": label if label in ("argmax", "stabilised") else "fixed",
                    "layer": pivots[0] if label.startswith("layer") else pivots,
                    "lambda": lam,
                    "kl": round(kl, 5),
                    "top1": round(agree, 4),
                    "compute_fraction": round(frac / len(pivots), 4),
                    "score": round(agree - kl, 5),
                }
            )
        if progress:
            progress(f"searched {label}")
    return table


def calibrate(
    lm,
    n_prompts: int = 8,
    length: int = 2048,
    r_struct: float = 0.2,
    r_kv: float = 0.1,
    window: int = 8,
    pooling: int = 7,
    compute_cap: float = DEFAULT_COMPUTE_CAP,
    lambdas: tuple[float, ...] = LAMBDAS,
    steps: int = 16,
    progress=None,
) -> dict:
    """Search (pivot rule or layer) x λ under the compute cap; return the profile dict."""
    if lm.tokenizer is None:
        raise StructKVError("calibration needs a model with a tokenizer")
    model = lm.model
    num_layers = len(model.model.layers)
    l_min, l_max = search_range(num_layers)
    cap_layer = min(l_max, max_pivot_under_cap(num_layers, r_struct, compute_cap))
    if cap_layer <= l_min:
        raise StructKVError(f"compute cap {compute_cap} leaves no pivot above layer {l_min}")
    method = StructKV(r_struct=r_struct, r_kv=r_kv, window=window, pooling=pooling, pivot=0)
    start = time.perf_counter()
    chat = bool(getattr(lm.tokenizer, "chat_template", None))
    runs = []
    for i, text in enumerate(calibration_prompts(lm.tokenizer, n_prompts, length)):
        ids = encode_prompt(lm.tokenizer, text, chat)
        runs.append(_record(model, ids, r_kv, window, pooling, steps))
        if progress:
            progress(f"recorded prompt {i + 1}/{n_prompts}")
    per_prompt_scales = [metric_scales(r.record.metrics) for r in runs]
    scales = tuple(sorted(s[i] for s in per_prompt_scales)[len(runs) // 2] for i in range(3))
    candidates: list[tuple[str, list[int]]] = [
        (f"layer {p}", [p] * len(runs)) for p in range(l_min, cap_layer + 1)
    ]
    for rule in ("argmax", "stabilised"):
        pivots = [_rule_pivot(r.record.metrics, l_min, cap_layer, rule, scales) for r in runs]
        candidates.append((rule, pivots))
    table = _search(model, runs, candidates, method, lambdas, steps, num_layers, progress)
    settings = dict(
        prompts=n_prompts, length=length, r_struct=r_struct, r_kv=r_kv, window=window,
        pooling=pooling, compute_cap=compute_cap, steps=steps,
    )  # fmt: skip
    profile = _profile(lm.model_id, num_layers, table, l_min, cap_layer, scales, settings)
    profile["seconds"] = round(time.perf_counter() - start, 1)
    return profile


def _profile(model_id, num_layers, table, l_min, cap_layer, scales, settings) -> dict:
    """The profile file's contents: the table's best row (ties: less compute) and the table."""
    best = max(table, key=lambda r: (r["score"], -r["compute_fraction"]))
    fixed = best["rule"] == "fixed"
    return {
        "format": FORMAT_VERSION,
        "model_id": model_id,
        "num_layers": num_layers,
        "lambda": best["lambda"],
        "pivot": best["layer"] if fixed else "online",
        "rule": None if fixed else best["rule"],
        "l_min": l_min,
        "l_max": cap_layer,
        "metric_scales": list(scales),
        "objective": "maximise top1 - KL (teacher-forced, vs full context); ties: less compute",
        "settings": settings,
        "best": best,
        "paper_preset": next(
            (r for r in table if r["rule"] == "argmax" and r["lambda"] == 0.9), None
        ),
        "table": table,
    }


def format_table(profile: dict) -> str:
    rows = ["rule        layer(s)            lambda  KL        top1    compute"]
    for r in profile["table"]:
        layer = r["layer"] if isinstance(r["layer"], int) else ",".join(map(str, r["layer"]))
        mark = "  <- chosen" if r == profile["best"] else ""
        rows.append(
            f"{r['rule']:<11} {layer:<19} {r['lambda']:<7} {r['kl']:<9.4f} "
            f"{r['top1']:<7.3f} {r['compute_fraction']:.3f}{mark}"
        )
    return "\n".join(rows)


def log(msg: str) -> None:
    print(f"[structkv calibrate] {msg}", file=sys.stderr, flush=True)
