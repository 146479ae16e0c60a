"""The base class every method extends: a small dataclass of documented knobs plus hooks.

Methods never run layers themselves; :func:`structkv.prefill.run_prefill` calls
``select_kv`` (which tokens this layer keeps for decoding, §5) and ``propagate`` (whether to
compact the running sequence now, §4) after every layer. Sharing that loop is what makes the
comparisons between methods fair.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from structkv.errors import StructKVError
from structkv.prefill import (
    LayerView,
    PrefillResult,
    PrefillStats,
    run_prefill,
    run_prefill_shared,
)
from structkv.saliency import POOL_MODES
from structkv.selection import budget, select_tokens


def check_ratio(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise StructKVError(
            f"{name} must be in (0, 1], got {value!r}; e.g. --{name.replace('_', '-')} 0.2"
        )


@dataclass
class Method:
    """Observation window ``window`` (last w prompt tokens, always kept, never counted against a
    budget), pooling kernel ``pooling`` over the non-window token scores (1 disables; §1),
    ``pool_mode`` "max" (SnapKV/FastKV) or "avg" (kvpress's SnapKVPress), and ``chunk``: 0 (or
    1) selects single tokens, c > 1 whole spans of c tokens (span-preserving,
    :func:`structkv.selection.topk_chunks_with_window`), for every method alike."""

    name: ClassVar[str] = "base"
    #: Whether the prefill loop must compute window attention, saliency and pivot metrics.
    needs_saliency: ClassVar[bool] = True

    window: int = 8
    pooling: int = 7
    pool_mode: str = "max"
    chunk: int = 0

    @classmethod
    def knobs(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def check_knobs(self) -> None:
        """Reject bad knob values before any model is loaded (called by ``get_method``)."""
        if not isinstance(self.window, int) or self.window < 1:
            raise StructKVError(f"window must be a positive integer, got {self.window!r}")
        if not isinstance(self.pooling, int) or self.pooling < 1 or self.pooling % 2 == 0:
            raise StructKVError(f"pooling must be an odd integer >= 1, got {self.pooling!r}")
        if not isinstance(self.chunk, int) or isinstance(self.chunk, bool) or self.chunk < 0:
            raise StructKVError(
                f"chunk must be an integer >= 0 (0: token-level selection), got {self.chunk!r}"
            )
        if self.pool_mode not in POOL_MODES:
            raise StructKVError(
                f"pool_mode must be one of {', '.join(POOL_MODES)}, got {self.pool_mode!r}"
            )
        for f in fields(self):
            if f.name.startswith("r_") and getattr(self, f.name) is not None:
                check_ratio(f.name, getattr(self, f.name))

    def validate(self, n_prompt: int) -> None:
        """Knobs plus what depends on the prompt; the message says which and how to fix it."""
        self.check_knobs()
        if n_prompt < 1:
            raise StructKVError("empty prompt; pass a non-empty --prompt or --prompt-file")
        if self.window >= n_prompt:
            raise StructKVError(
                f"window ({self.window}) must be smaller than the prompt ({n_prompt} tokens); "
                f"use a longer prompt or a smaller --window"
            )

    def with_profile(self, profile: dict | None) -> tuple[Method, str | None]:
        """This configuration with model-dependent defaults filled in from a calibration
        profile (§6), and a note for the user when a fallback was taken. Pure: the caller finds
        the profile and prints the note (:func:`structkv.profile.resolve_method`)."""
        return self, None

    def to_dict(self) -> dict:
        """The serialisable configuration (engine manifests, results files): name + knobs."""
        out: dict = {"name": self.name}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def select(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """:func:`structkv.selection.select_tokens` with this method's window and pooling."""
        return select_tokens(scores, k, self.window, self.pooling, self.pool_mode, self.chunk)

    def begin(self, num_layers: int, n_prompt: int) -> object:
        """Per-prefill mutable state (the dataclass itself stays a pure configuration)."""
        return None

    def kv_budget(self, layer: int, num_layers: int, n_prompt: int) -> int | None:
        """Non-window tokens this layer keeps per KV head; None keeps everything."""
        return None

    def select_kv(self, view: LayerView, state: object) -> torch.Tensor | None:
        """§5: per-KV-head top-k of pooled saliency plus the window, ``[G, k + w]``, sorted."""
        k = self.kv_budget(view.layer, view.num_layers, view.prompt_len)
        if k is None:
            return None
        return self.select(view.saliency_heads, k)

    def defers_kv(self, view: LayerView, state: object) -> bool:
        """Whether this layer's KV choice waits for evidence from deeper layers (StructKV's
        ``kv_evidence``): the prefill then hands its K/V to :meth:`defer` and fills the cache
        slot from :meth:`resolve_deferred` once the last layer has run."""
        return False

    def defer(self, index: int, view: LayerView, k: torch.Tensor, v: torch.Tensor, state) -> None:
        raise NotImplementedError

    def observe_compacted(self, view: LayerView, state: object) -> None:
        """See a layer after the pivot (on the propagated tokens); the deferred choices may use
        what it attends to."""

    def resolve_deferred(self, state: object, extra_capacity: int) -> list[tuple[int, object]]:
        """(layer index, LayerCache) for every deferred layer."""
        return []

    def refine(self, view: LayerView, state: object) -> torch.Tensor | None:
        """After a layer past the pivot: indices (into the tokens present) to keep from the
        next layer on, or None (a second, deeper compaction; StructKV's ``refine_layer``)."""
        return None

    def track(self, view: LayerView, state: object) -> None:
        """Fold a full-length layer into the method's running state (StructKV: centrality and
        the online pivot statistics); called before :meth:`propagate` on every such layer."""

    def propagate(self, view: LayerView, state: object) -> torch.Tensor | None:
        """§4: indices (into the tokens present) to keep from the next layer on, or None.
        A decision only: what it reads was folded into ``state`` by :meth:`track`."""
        return None

    def finish(self, state: object, stats: PrefillStats) -> None:
        """Record method-specific facts (λ, rule, ...) in the stats."""

    def prefill(
        self, model, input_ids: torch.Tensor, extra_capacity: int = 0, observer=None
    ) -> PrefillResult:
        """Compressed prefill of ``input_ids`` (``[N]``); ``observer(view)`` sees every layer."""
        self.validate(int(input_ids.shape[0]))
        return run_prefill(model, input_ids, self, extra_capacity, observer=observer)


def prefill_shared(
    model, input_ids: torch.Tensor, methods: list[Method], extra_capacity: int = 0
) -> list[PrefillResult]:
    """Each method's prefill of the same prompt, with the full-length layers run once.

    Methods that use the shared loop as is and the same observation window ride one pass
    (:func:`structkv.prefill.run_prefill_shared`); the others (GemFilter re-runs the model) run
    alone. The results equal ``[m.prefill(model, input_ids) for m in methods]``.
    """
    n_prompt = int(input_ids.shape[0])
    for m in methods:
        m.validate(n_prompt)
    groups: dict[object, list[int]] = {}
    for i, m in enumerate(methods):
        shareable = type(m).prefill is Method.prefill
        key = (m.window if m.needs_saliency else None) if shareable else ("alone", i)
        groups.setdefault(key, []).append(i)
    # Saliency-free methods (StreamingLLM) join any group: they read nothing window-specific.
    free = groups.pop(None, [])
    if free:
        target = next((k for k in groups if not (isinstance(k, tuple))), None)
        groups.setdefault(target, []).extend(free)
    results: list[PrefillResult | None] = [None] * len(methods)
    for key, members in groups.items():
        if isinstance(key, tuple):
            (i,) = members
            results[i] = methods[i].prefill(model, input_ids, extra_capacity)
            continue
        shared = run_prefill_shared(model, input_ids, [methods[i] for i in members], extra_capacity)
        for i, r in zip(members, shared, strict=True):
            results[i] = r
    return results


@dataclass
class SaliencyKVMethod(Method):
    """A method that keeps ``r_kv`` · N salient tokens per layer and KV head (§5)."""

    r_kv: float = 0.1

    def kv_budget(self, layer: int, num_layers: int, n_prompt: int) -> int | None:
        return budget(self.r_kv, n_prompt)
