"""GemFilter: filter tokens with an early layer, then re-run the whole model on them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from structkv.errors import StructKVError
from structkv.methods.base import Method
from structkv.methods.full import Full
from structkv.prefill import LayerView, PrefillResult, PrefillStats, run_prefill
from structkv.selection import budget, select_tokens, topk_chunks_with_window, topk_with_window

#: How the filter layer scores tokens: "last" is GemFilter's own; "window" is the pooled window
#: saliency SnapKV, FastKV and StructKV select by, so that only the re-run differs from FastKV.
FILTER_SCORES = ("last", "window")


@dataclass
class _FilterState:
    layer: int
    selected: torch.Tensor | None = field(default=None)


@dataclass
class GemFilter(Method):
    """Runs layers 0..``filter_layer`` (default floor(0.4 L)), keeps the ``r_kv`` · N tokens the
    LAST query attends to most there (summed over heads, average-pooled with ``avg_kernel``) plus
    the window, and re-runs the whole model on those tokens alone with positions restarting at 0.
    The KV cache is all of that re-run.

    ``filter_score`` "window" selects instead by the window saliency the other methods use
    (pooled with ``pooling`` / ``pool_mode``, spans of ``chunk``): FastKV's selection at the same
    layer followed by GemFilter's re-run, which separates what the re-run itself is worth from
    what the scoring is worth (docs/RESULTS.md)."""

    name = "gemfilter"

    r_kv: float = 0.1
    filter_layer: int | None = None
    avg_kernel: int = 5
    filter_score: str = "last"

    def check_knobs(self) -> None:
        super().check_knobs()
        if self.filter_score not in FILTER_SCORES:
            raise StructKVError(
                f"unknown filter_score {self.filter_score!r}; choose one of "
                f"{', '.join(FILTER_SCORES)} (e.g. --filter-score window)"
            )

    def begin(self, num_layers: int, n_prompt: int) -> object:
        layer = int(0.4 * num_layers) if self.filter_layer is None else self.filter_layer
        if not 0 <= layer < num_layers:
            raise StructKVError(
                f"filter_layer must be a layer in [0, {num_layers - 1}] for this "
                f"{num_layers}-layer model, got {layer}; pass --filter-layer in that range"
            )
        return _FilterState(layer)

    def track(self, view: LayerView, state: _FilterState) -> None:
        if view.layer == state.layer and self.filter_score == "window":
            k = budget(self.r_kv, view.prompt_len)
            state.selected = select_tokens(
                view.saliency, k, self.window, self.pooling, self.pool_mode, self.chunk
            )
        elif view.layer == state.layer:
            scores = view.attn[:, -1, :].sum(0)
            pad = self.avg_kernel // 2
            scores = F.avg_pool1d(
                scores[None, None], self.avg_kernel, 1, pad, count_include_pad=False
            )[0, 0]
            k = budget(self.r_kv, view.prompt_len)
            state.selected = (
                topk_chunks_with_window(scores, k, self.window, self.chunk)
                if self.chunk > 1
                else topk_with_window(scores, k, self.window)
            )

    def finish(self, state: _FilterState, stats: PrefillStats) -> None:
        stats.pivot_layer = state.layer
        if state.selected is not None:
            stats.propagated_positions = state.selected.tolist()

    def prefill(
        self, model, input_ids: torch.Tensor, extra_capacity: int = 0, observer=None
    ) -> PrefillResult:
        self.validate(int(input_ids.shape[0]))
        n_prompt = int(input_ids.shape[0])
        num_layers = len(model.model.layers)
        layer = self.begin(num_layers, n_prompt).layer
        first = run_prefill(model, input_ids, self, stop_after=layer)
        kept = first.stats.propagated_positions
        second = run_prefill(
            model, input_ids[kept], Full(window=1), extra_capacity, observer=observer
        )
        stats = second.stats
        stats.method = self.name
        stats.prompt_tokens = n_prompt
        stats.pivot_layer = layer
        stats.propagated_tokens = len(kept)
        stats.propagated_positions = kept
        stats.prefill_s += first.stats.prefill_s
        stats.timings = {"filter_pass": first.stats.prefill_s, "rerun": second.stats.prefill_s}
        stats.kv_bytes_full = stats.kv_bytes_full * n_prompt // len(kept)
        stats.compute_fraction = (layer + 1) / num_layers + len(kept) / n_prompt
        for name in ("entropy", "sparsity", "variance"):
            setattr(stats, name, getattr(first.stats, name))
        return PrefillResult(second.cache, second.logits, stats)
