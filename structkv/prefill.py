"""The shared prefill every method runs through, so comparisons between methods are fair.

It has the engine's phases, under the same names (``structkv-export`` traces each as a graph):

- :func:`pre_pivot`  layers on the whole prompt, computing saliency (§1), the method's running
  state such as centrality (§2, the ``track`` hook) and the pivot statistics (§3), until the
  method decides to propagate (the ``propagate`` hook);
- :func:`compact`    keep the chosen tokens' hidden rows with their original positions (§4);
- :func:`post_pivot` the remaining layers on the compacted tokens;
- :func:`kv_select`  after every layer of either phase, the tokens it keeps for decoding (§5).

Several methods share one :func:`pre_pivot` pass: before its pivot a method's hidden states are
the full model's, so an evaluation of eight methods pays for about one full prefill.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from structkv.cache import CompressedKVCache, LayerCache
from structkv.layers import decoder_layers, final_logits, head_dims, prefill_layer, rope
from structkv.pivot import attention_metrics, transition_scores
from structkv.saliency import layer_saliency
from structkv.selection import gather_tokens


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
    # A second, deeper compaction (the method's ``refine`` hook), if it made one.
    refine_layer: int | None = None
    refined_tokens: int | None = None
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

    def complete(
        self, kv_tokens_per_layer: list[int], tokens_run: int, kv_bytes_per_token: int
    ) -> PrefillStats:
        """Fill what follows from the counts (the torch path and the engine both call this):
        KV bytes kept vs full context, the compute fraction and the transition scores T_l."""
        self.kv_tokens_per_layer = list(kv_tokens_per_layer)
        self.kv_bytes = kv_bytes_per_token * sum(self.kv_tokens_per_layer)
        self.kv_bytes_full = kv_bytes_per_token * self.num_layers * self.prompt_tokens
        self.compute_fraction = tokens_run / (self.num_layers * self.prompt_tokens)
        if len(self.entropy) > 1:
            self.transition = transition_scores(
                list(zip(self.entropy, self.sparsity, self.variance))
            )
        return self

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("propagated_positions")
        return out


@dataclass
class Compacted:
    """A prompt after :func:`compact`: everything :func:`post_pivot` needs to continue.

    A method leaving a shared :func:`pre_pivot` pass hands this over with its ``state`` and
    ``stats`` so that the result is exactly that of one uninterrupted prefill; calibration builds
    one per candidate (pivot, λ) to re-run only the layers after the pivot.
    """

    layer: int  # the pivot: the last layer that ran on the whole prompt
    hidden: torch.Tensor  # [1, n, hidden] input to layer + 1
    positions: torch.Tensor  # [n] original positions, ascending
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
    exit: Compacted | None = None


@dataclass
class _Pass:
    """What every phase of one prefill reads: the model, the prompt and the shared settings."""

    model: object
    n_prompt: int
    window: int  # observation window of the methods that compute saliency; 0 if none does
    extra_capacity: int
    observer: Callable[[LayerView], None] | None
    timer: _Timer
    start: float

    @property
    def layers(self):
        return decoder_layers(self.model)


def _run_layer(ctx: _Pass, index: int, h, positions, cos, sin, full_length: bool):
    """One layer plus what the methods read of it: the view (saliency; pivot statistics on
    full-length layers only, nothing reads them after compaction) and this layer's K/V."""
    layers, timer = ctx.layers, ctx.timer
    layer = layers[index]
    t = time.perf_counter()
    h, q, k, v = prefill_layer(layer, h, positions, cos, sin)
    t = timer.add("layers_full" if full_length else "layers_compacted", t)
    _, num_kv, _ = head_dims(ctx.model)
    view = LayerView(index, len(layers), ctx.n_prompt, num_kv, positions, hidden=h)
    if ctx.window:
        view.attn, view.saliency_heads = layer_saliency(layer, q, k, positions, ctx.window, num_kv)
        view.saliency = view.saliency_heads.sum(0)
        t = timer.add("saliency", t)
        if full_length:
            view.metrics = attention_metrics(view.attn, view.saliency)
            timer.add("pivot_metrics", t)
    if ctx.observer is not None:
        ctx.observer(view)
    return h, k, v, view


def kv_select(ctx: _Pass, rider: _Rider, view: LayerView, k, v) -> None:
    """§5 for one layer: the method's per-head token choice, gathered into a decode cache."""
    t = time.perf_counter()
    if rider.method.defers_kv(view, rider.state):  # chosen after the last layer (evidence)
        rider.method.defer(len(rider.caches), view, k, v, rider.state)
        rider.caches.append(None)
        ctx.timer.add("kv_select", t)
        return
    keep = rider.method.select_kv(view, rider.state)
    if keep is None:
        kept_k, kept_v, kept_pos = k, v, view.positions.expand(view.num_kv_heads, -1)
    else:
        kept_k, kept_v = gather_tokens(k[0], keep)[None], gather_tokens(v[0], keep)[None]
        kept_pos = view.positions[keep]
    rider.caches.append(LayerCache.from_kept(kept_k, kept_v, kept_pos, ctx.extra_capacity))
    ctx.timer.add("kv_select", t)


def compact(hidden: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor):
    """§4: the kept tokens' hidden rows ``[1, n', E]`` and their original positions ``[n']``."""
    return hidden[:, keep], positions[keep]


def pre_pivot(ctx: _Pass, input_ids: torch.Tensor, riders: list[_Rider], stop_after: int | None):
    """Layers on the whole prompt until every rider has propagated (or the model ends).

    A rider whose ``propagate`` hook returns indices leaves with a :class:`Compacted` state in
    ``rider.exit``. Returns the last hidden state and the riders still running full length.
    """
    timer, num_layers = ctx.timer, len(ctx.layers)
    positions = torch.arange(ctx.n_prompt, device=input_ids.device)
    h = ctx.model.model.embed_tokens(input_ids[None])
    cos, sin = rope(ctx.model, positions, h.dtype)
    last = num_layers - 1 if stop_after is None else stop_after
    active = list(riders)
    for index in range(last + 1):
        h, k, v, view = _run_layer(ctx, index, h, positions, cos, sin, full_length=True)
        for rider in list(active):
            if view.metrics is not None and rider.method.needs_saliency:
                for name, value in zip(("entropy", "sparsity", "variance"), view.metrics):
                    getattr(rider.stats, name).append(value)
            if stop_after is None:  # a filter pass (GemFilter) decodes nothing: no cache to fill
                kv_select(ctx, rider, view, k, v)
            if index == num_layers - 1:
                continue
            t = time.perf_counter()
            rider.method.track(view, rider.state)
            chosen = rider.method.propagate(view, rider.state)
            t = timer.add("centrality_pivot", t)
            if chosen is not None:
                kept_h, kept_pos = compact(h, positions, chosen)
                rider.exit = Compacted(index, kept_h, kept_pos, rider.caches, rider.state)
                t = timer.add("compaction", t)
                rider.stats.pivot_layer = index
                rider.stats.propagated_positions = kept_pos.tolist()
                rider.stats.timings = dict(timer.totals)
                rider.stats.prefill_s = t - ctx.start
                rider.exit.stats = rider.stats
                active.remove(rider)
        if not active:
            break
    return h, active


def post_pivot(ctx: _Pass, rider: _Rider, compacted: Compacted) -> tuple[torch.Tensor, int]:
    """The layers after the pivot on the compacted tokens (original positions); returns the
    last hidden state and the token-layers run. KV selection runs after each layer as in
    :func:`pre_pivot`; a method's ``refine`` hook may compact the running tokens once more
    (a deeper, smaller selection: budgets that shrink with depth)."""
    t = time.perf_counter()
    h, positions = compacted.hidden, compacted.positions
    cos, sin = rope(ctx.model, positions, h.dtype)
    if compacted.stats is not None:  # continuing a shared pass: RoPE is part of compaction
        ctx.timer.add("compaction", t)
    tokens_run = 0
    for index in range(compacted.layer + 1, len(ctx.layers)):
        h, k, v, view = _run_layer(ctx, index, h, positions, cos, sin, full_length=False)
        tokens_run += int(positions.shape[0])
        kv_select(ctx, rider, view, k, v)
        rider.method.observe_compacted(view, rider.state)
        if index == len(ctx.layers) - 1:
            continue
        t = time.perf_counter()
        chosen = rider.method.refine(view, rider.state)
        if chosen is not None:
            h, positions = compact(h, positions, chosen)
            cos, sin = rope(ctx.model, positions, h.dtype)
            rider.stats.refine_layer, rider.stats.refined_tokens = index, int(positions.shape[0])
            ctx.timer.add("compaction", t)
    return h, tokens_run


def _new_pass(model, n_prompt, methods, extra_capacity, observer, timings=None) -> _Pass:
    windows = {m.window for m in methods if m.needs_saliency}
    if len(windows) > 1:
        raise ValueError(f"methods sharing a pass need one window, got {sorted(windows)}")
    window = next(iter(windows)) if windows else 0
    timer = _Timer(timings)
    return _Pass(model, n_prompt, window, extra_capacity, observer, timer, time.perf_counter())


def _result(ctx: _Pass, rider: _Rider, h, tokens_run: int, prior_s=0.0, logits=True):
    t = time.perf_counter()
    for index, cache in rider.method.resolve_deferred(rider.state, ctx.extra_capacity):
        rider.caches[index] = cache
    ctx.timer.add("kv_select", t)
    stats = rider.stats
    stats.prefill_s = time.perf_counter() - ctx.start + prior_s
    stats.timings = dict(ctx.timer.totals)
    stats.overhead_s = stats.timings.get("pivot_metrics", 0.0) + stats.timings.get(
        "centrality_pivot", 0.0
    )
    cache = CompressedKVCache(rider.caches, next_position=ctx.n_prompt)
    _, num_kv, head_dim = head_dims(ctx.model)
    stats.complete(cache.tokens_per_layer(), tokens_run, 2 * num_kv * head_dim * h.element_size())
    rider.method.finish(rider.state, stats)
    out = final_logits(ctx.model, h[:, -1])[0] if logits else h.new_empty(0)
    return PrefillResult(cache, out, stats)


@torch.inference_mode()
def continue_prefill(
    model,
    n_prompt: int,
    method,
    compacted: Compacted,
    extra_capacity: int = 0,
    observer: Callable[[LayerView], None] | None = None,
) -> PrefillResult:
    """:func:`post_pivot` from a :class:`Compacted` state to the finished result (a method
    leaving a shared pass, or a calibration candidate)."""
    prior = compacted.stats
    ctx = _new_pass(
        model, n_prompt, [method], extra_capacity, observer, prior.timings if prior else None
    )
    state = compacted.state
    if state is None:
        state = method.begin(len(ctx.layers), n_prompt)
    stats = prior or PrefillStats(method.name, n_prompt, len(ctx.layers))
    stats.pivot_layer, stats.propagated_tokens = compacted.layer, int(compacted.positions.shape[0])
    rider = _Rider(method, state, stats, list(compacted.caches))
    h, tokens_after = post_pivot(ctx, rider, compacted)
    tokens_run = (compacted.layer + 1) * n_prompt + tokens_after
    return _result(ctx, rider, h, tokens_run, prior.prefill_s if prior else 0.0)


@torch.inference_mode()
def run_prefill_shared(
    model,
    input_ids: torch.Tensor,
    methods: list,
    extra_capacity: int = 0,
    stop_after: int | None = None,
    observer: Callable[[LayerView], None] | None = None,
) -> list[PrefillResult]:
    """One prefill per method, sharing :func:`pre_pivot` until each method propagates; a
    method that propagates continues alone (:func:`continue_prefill`). Results equal separate
    :func:`run_prefill` calls; timings are those of the shared pass. ``stop_after`` ends the
    pass after that layer (GemFilter's filter pass) with empty logits and no cache."""
    n_prompt = int(input_ids.shape[0])
    ctx = _new_pass(model, n_prompt, methods, extra_capacity, observer)
    num_layers = len(ctx.layers)
    riders = [
        _Rider(
            m,
            m.begin(num_layers, n_prompt),
            PrefillStats(m.name, n_prompt, num_layers, propagated_tokens=n_prompt),
            [],
        )
        for m in methods
    ]
    h, _ = pre_pivot(ctx, input_ids, riders, stop_after)
    layers_run = num_layers if stop_after is None else stop_after + 1
    results = []
    for rider in riders:
        if rider.exit is not None:
            results.append(
                continue_prefill(
                    model, n_prompt, rider.method, rider.exit, extra_capacity, observer
                )
            )
        else:
            full = _result(ctx, rider, h, layers_run * n_prompt, logits=stop_after is None)
            results.append(full)
    return results


def run_prefill(
    model,
    input_ids: torch.Tensor,
    method,
    extra_capacity: int = 0,
    stop_after: int | None = None,
    observer: Callable[[LayerView], None] | None = None,
) -> PrefillResult:
    """Prefill ``input_ids`` (``[N]``) with ``method``'s hooks; see the module docstring.

    ``extra_capacity`` preallocates that many decode slots per layer; ``observer(view)`` sees
    every layer's view (fidelity analysis and calibration read hidden states there)."""
    return run_prefill_shared(model, input_ids, [method], extra_capacity, stop_after, observer)[0]
