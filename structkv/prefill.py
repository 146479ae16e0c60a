"""The shared prefill loop every method runs through, so comparisons between methods are fair.

One pass over the layers. After each layer the method may (a) choose the KV tokens that layer
keeps for decoding (§5) and (b) once, compact the running sequence to a subset of tokens with
their original positions (§4). Saliency (§1) and the pivot metrics (§3) are computed here once
per layer for any method that asks for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from structkv.cache import CompressedKVCache, LayerCache
from structkv.layers import (
    decoder_layers,
    final_logits,
    head_dims,
    prefill_layer,
    rope,
    sliding_window,
)
from structkv.pivot import attention_metrics, transition_scores
from structkv.saliency import saliency_per_head, window_attention


@dataclass
class LayerView:
    """What a method sees after layer ``layer`` ran over ``n`` of the ``prompt_len`` tokens."""

    layer: int
    num_layers: int
    prompt_len: int
    num_kv_heads: int
    positions: torch.Tensor  # [n] original positions of the tokens present, ascending
    attn: torch.Tensor | None = None  # [H, w, n] window attention (fp32)
    saliency_heads: torch.Tensor | None = None  # [G, n]
    saliency: torch.Tensor | None = None  # [n]
    metrics: tuple[float, float, float] | None = None  # (H, ρ, V); full-length layers only
    hidden: torch.Tensor | None = None  # [1, n, hidden] output of this layer (read-only)

    @property
    def n(self) -> int:
        return int(self.positions.shape[0])


@dataclass
class PrefillStats:
    """What a prefill did; ``to_json`` is the CLI's ``stats`` object."""

    method: str
    prompt_tokens: int
    num_layers: int
    pivot_layer: int | None = None
    pivot_rule: str | None = None
    lam: float | None = None
    propagated_tokens: int = 0
    kv_tokens_per_layer: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    overhead_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    kv_bytes: int = 0
    kv_bytes_full: int = 0
    compute_fraction: float = 1.0
    # Pivot statistics (§3) of each full-length layer, 0..L* (all layers without propagation).
    entropy: list[float] = field(default_factory=list)
    sparsity: list[float] = field(default_factory=list)
    variance: list[float] = field(default_factory=list)
    transition: list[float] = field(default_factory=list)
    propagated_positions: list[int] | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("propagated_positions")
        return out


@dataclass
class Resume:
    """Start a prefill after ``layer`` from a known (already compacted) state.

    Calibration uses it to try many pivots/λ without re-running the shared early layers, and a
    shared pass hands each method that propagates over to its own compacted run with it. When
    ``state`` and ``stats`` are given (a method leaving a shared pass) the run continues them, so
    the result is exactly that of one uninterrupted prefill.
    """

    layer: int
    hidden: torch.Tensor  # [1, n, hidden] input to layer + 1
    positions: torch.Tensor  # [n]
    caches: list[LayerCache]  # KV of layers 0..layer, already selected
    state: object = None
    stats: PrefillStats | None = None


@dataclass
class PrefillResult:
    cache: CompressedKVCache
    logits: torch.Tensor  # [V] next-token logits at the last prompt position
    stats: PrefillStats


class _Timer:
    def __init__(self, totals: dict[str, float] | None = None) -> None:
        self.totals: dict[str, float] = dict(totals or {})

    def add(self, key: str, start: float) -> float:
        now = time.perf_counter()
        self.totals[key] = self.totals.get(key, 0.0) + now - start
        return now


@dataclass
class _Rider:
    """One method's progress through a (possibly shared) pass."""

    method: object
    state: object
    stats: PrefillStats
    caches: list[LayerCache]
    exit: Resume | None = None


def _gather_heads(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x ``[1, G, n, D]``, idx ``[G, K]`` -> ``[1, G, K, D]`` (each head its own tokens)."""
    return x[0].gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))[None]


def run_prefill(
    model,
    input_ids: torch.Tensor,
    method,
    extra_capacity: int = 0,
    stop_after: int | None = None,
    resume: Resume | None = None,
    observer: Callable[[LayerView], None] | None = None,
) -> PrefillResult:
    """Prefill ``input_ids`` (``[N]``) with ``method``'s hooks; see the module docstring.

    ``extra_capacity`` preallocates that many decode slots per layer. ``stop_after`` ends the pass
    after that layer (GemFilter's filter pass) and returns empty logits. ``resume`` starts after
    a given layer from a given compacted state (no further propagation happens then).
    ``observer(view)`` sees every layer's view (fidelity analysis reads hidden states there).
    """
    return run_prefill_shared(
        model, input_ids, [method], extra_capacity, stop_after, resume, observer
    )[0]


@torch.inference_mode()
def run_prefill_shared(
    model,
    input_ids: torch.Tensor,
    methods: list,
    extra_capacity: int = 0,
    stop_after: int | None = None,
    resume: Resume | None = None,
    observer: Callable[[LayerView], None] | None = None,
) -> list[PrefillResult]:
    """One prefill per method, sharing every full-length layer until each method propagates.

    Before its pivot a method's hidden states are the full model's, so the layers up to there
    run once for all of them (an evaluation of eight methods at 4K pays for about one full
    prefill instead of five); a method that propagates continues on its own compacted tokens.
    Results equal separate :func:`run_prefill` calls; timings are those of the shared pass.
    Methods that compute saliency must share one observation window.
    """
    windows = {m.window for m in methods if m.needs_saliency}
    if len(windows) > 1:
        raise ValueError(f"methods sharing a pass need one window, got {sorted(windows)}")
    if resume is not None and len(methods) != 1:
        raise ValueError("resume continues exactly one method")
    t_start = time.perf_counter()
    layers = decoder_layers(model)
    num_layers = len(layers)
    n_prompt = int(input_ids.shape[0])
    _, num_kv, head_dim = head_dims(model)
    prior = resume.stats if resume is not None else None
    timer = _Timer(prior.timings if prior is not None else None)

    if resume is None:
        first, positions = 0, torch.arange(n_prompt)
        h = model.model.embed_tokens(input_ids[None])
        riders = [
            _Rider(
                m,
                m.begin(num_layers, n_prompt),
                PrefillStats(m.name, n_prompt, num_layers, propagated_tokens=n_prompt),
                [],
            )
            for m in methods
        ]
    else:
        (method,) = methods
        first, h, positions = resume.layer + 1, resume.hidden, resume.positions
        state = resume.state if resume.state is not None else method.begin(num_layers, n_prompt)
        stats = prior or PrefillStats(method.name, n_prompt, num_layers)
        stats.pivot_layer, stats.propagated_tokens = resume.layer, int(positions.shape[0])
        riders = [_Rider(method, state, stats, list(resume.caches))]
    compacted = resume is not None
    needs_saliency = bool(windows)
    window = next(iter(windows)) if windows else 0
    t = time.perf_counter()
    cos, sin = rope(model, positions, h.dtype)
    if prior is not None:
        timer.add("compaction", t)
    tokens_run = first * n_prompt
    last = num_layers - 1 if stop_after is None else stop_after
    active = list(riders)
    for index in range(first, last + 1):
        layer = layers[index]
        t = time.perf_counter()
        h, q, k, v = prefill_layer(layer, h, positions, cos, sin)
        tokens_run += positions.shape[0]
        t = timer.add("layers_compacted" if compacted else "layers_full", t)
        view = LayerView(index, num_layers, n_prompt, num_kv, positions, hidden=h)
        if needs_saliency:
            view.attn = window_attention(
                q, k, positions, window, layer.self_attn.scaling, sliding_window(layer)
            )
            view.saliency_heads = saliency_per_head(view.attn, num_kv)
            view.saliency = view.saliency_heads.sum(0)
            t = timer.add("saliency", t)
            # The pivot statistics describe full-length layers; after compaction nothing reads
            # them, so the hot post-pivot path skips them.
            if not compacted:
                view.metrics = attention_metrics(view.attn, view.saliency)
                t = timer.add("pivot_metrics", t)

        if observer is not None:
            observer(view)
        for rider in list(active):
            if view.metrics is not None and rider.method.needs_saliency:
                for name, value in zip(("entropy", "sparsity", "variance"), view.metrics):
                    getattr(rider.stats, name).append(value)
            if stop_after is None:  # a filter pass (GemFilter) decodes nothing: no cache to fill
                keep = rider.method.select_kv(view, rider.state)
                if keep is None:
                    kept_k, kept_v = k, v
                    kept_pos = positions.expand(num_kv, -1)
                else:
                    kept_k, kept_v = _gather_heads(k, keep), _gather_heads(v, keep)
                    kept_pos = positions[keep]
                rider.caches.append(LayerCache.from_kept(kept_k, kept_v, kept_pos, extra_capacity))
                t = timer.add("kv_select", t)
            if not compacted and index < num_layers - 1:
                chosen = rider.method.propagate(view, rider.state)
                t = timer.add("centrality_pivot", t)
                if chosen is not None:
                    kept = positions[chosen]
                    rider.exit = Resume(
                        index, h[:, chosen], kept, rider.caches, rider.state, rider.stats
                    )
                    t = timer.add("compaction", t)
                    rider.stats.pivot_layer = index
                    rider.stats.propagated_positions = kept.tolist()
                    rider.stats.timings = dict(timer.totals)
                    rider.stats.prefill_s = t - t_start
                    active.remove(rider)
        if not active:
            break

    logits = final_logits(model, h[:, -1])[0] if stop_after is None and active else None
    results = []
    for rider in riders:
        if rider.exit is not None:
            results.extend(
                run_prefill_shared(
                    model,
                    input_ids,
                    [rider.method],
                    extra_capacity,
                    resume=rider.exit,
                    observer=observer,
                )
            )
            continue
        stats = rider.stats
        stats.prefill_s = time.perf_counter() - t_start + (prior.prefill_s if prior else 0.0)
        stats.timings = dict(timer.totals)
        cache = CompressedKVCache(rider.caches, next_position=n_prompt)
        results.append(_finish(rider, cache, logits, tokens_run, num_kv, head_dim, h))
    return results


def _finish(rider, cache, logits, tokens_run, num_kv, head_dim, h) -> PrefillResult:
    stats = rider.stats
    stats.overhead_s = stats.timings.get("pivot_metrics", 0.0) + stats.timings.get(
        "centrality_pivot", 0.0
    )
    stats.kv_tokens_per_layer = cache.tokens_per_layer()
    stats.kv_bytes = cache.nbytes()
    elem = h.element_size()
    stats.kv_bytes_full = 2 * stats.num_layers * num_kv * head_dim * stats.prompt_tokens * elem
    stats.compute_fraction = tokens_run / (stats.num_layers * stats.prompt_tokens)
    if len(stats.entropy) > 1:
        stats.transition = transition_scores(
            list(zip(stats.entropy, stats.sparsity, stats.variance))
        )
    rider.method.finish(rider.state, stats)
    return PrefillResult(cache, logits if logits is not None else torch.empty(0), stats)
