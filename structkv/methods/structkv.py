"""StructKV (§1–§5): centrality over depth, a dynamic pivot, propagation, decoupled KV.

``structkv`` reads the model's calibration profile (§6) for λ and the pivot; ``structkv-paper``
is the paper's preset (λ 0.9, online argmax rule) and is always reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from structkv.centrality import Centrality
from structkv.errors import StructKVError
from structkv.methods.base import SaliencyKVMethod
from structkv.pivot import RULES, OnlinePivot, search_range
from structkv.prefill import LayerView, PrefillStats
from structkv.selection import budget

PAPER_LAMBDA = 0.9


def _is_layer(pivot: object) -> bool:
    return isinstance(pivot, int) and not isinstance(pivot, bool) and pivot >= 0


@dataclass
class _State:
    centrality: Centrality
    fixed: int | None
    online: OnlinePivot | None
    decided: int | None = None  # the online rule's L*, once observed


@dataclass
class StructKV(SaliencyKVMethod):
    """Compute budget ``r_struct`` (tokens propagated after the pivot) and memory budget ``r_kv``
    (tokens kept per layer and KV head) are separate knobs.

    ``lam``: centrality decay λ (None: from the profile). ``pivot``: "auto" (profile), "online"
    (detect with ``rule`` while layers run) or a fixed layer index, the last full-length layer.
    ``l_min``/``l_max``: pivot search range (default [0.2 L, 0.7 L]); ``tau``: threshold of the
    "stabilised" rule; ``scales``: metric scales for the online score (None: running max).
    """

    name = "structkv"

    r_struct: float = 0.2
    lam: float | None = None
    pivot: int | str = "auto"
    rule: str = "argmax"
    l_min: int | None = None
    l_max: int | None = None
    tau: float = 0.2
    scales: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.scales, list):  # from JSON (manifest, profile)
            self.scales = tuple(self.scales)

    def check_knobs(self) -> None:
        super().check_knobs()
        if self.lam is not None and not (
            isinstance(self.lam, (int, float)) and 0.0 <= self.lam <= 1.0
        ):
            raise StructKVError(f"lambda must be in [0, 1], got {self.lam!r}; e.g. --lambda 0.3")
        if self.rule not in RULES:
            raise StructKVError(
                f"unknown pivot rule {self.rule!r}; choose one of {', '.join(RULES)}"
            )
        if not (self.pivot in ("auto", "online") or _is_layer(self.pivot)):
            raise StructKVError(
                f"pivot must be auto, online or a layer index >= 0, got {self.pivot!r}"
            )

    def check_engine(self, num_layers: int | None = None) -> None:
        """What an exported engine needs beyond :meth:`check_knobs`: r_kv <= r_struct, because
        the paged KV cache keeps the same token count in every layer and the layers after the
        pivot only hold the propagated tokens; and, once the model is known (``num_layers``), a
        fixed pivot inside it."""
        if self.chunk > 1:
            raise StructKVError(
                f"--chunk {self.chunk}: engines select single tokens (their graphs, kernels and "
                "TensorRT plugin have fixed output lengths); drop --chunk for export, or use "
                "chunked selection with structkv generate / eval"
            )
        if self.r_kv > self.r_struct:
            raise StructKVError(
                f"--r-kv ({self.r_kv}) must not exceed --r-struct ({self.r_struct}) in an engine: "
                "layers after the pivot only hold the propagated tokens, and the paged cache "
                "keeps the same count in every layer"
            )
        if num_layers is None:
            return
        if not _is_layer(self.pivot):
            raise StructKVError(
                f"an engine needs a fixed pivot layer, got {self.pivot!r}: pass --pivot N "
                "(or calibrate the model so that --pivot auto finds a fixed layer)"
            )
        if not 0 <= self.pivot < num_layers - 1:
            raise StructKVError(
                f"--pivot must be in [0, {num_layers - 2}] for this {num_layers}-layer model, "
                f"got {self.pivot}"
            )

    def with_profile(self, profile: dict | None) -> tuple[StructKV, str | None]:
        if self.pivot != "auto":
            return (self if self.lam is not None else replace(self, lam=PAPER_LAMBDA)), None
        if profile is None:
            note = (
                f"no calibration profile; using the paper preset (online argmax pivot, lambda "
                f"{PAPER_LAMBDA})"
            )
            lam = self.lam if self.lam is not None else PAPER_LAMBDA
            return replace(self, pivot="online", lam=lam), note
        scales = profile.get("metric_scales")
        return replace(
            self,
            lam=self.lam if self.lam is not None else profile["lambda"],
            pivot=profile["pivot"],
            rule=profile.get("rule") or self.rule,
            scales=tuple(scales) if scales else None,
            l_min=self.l_min if self.l_min is not None else profile.get("l_min"),
            l_max=self.l_max if self.l_max is not None else profile.get("l_max"),
        ), None

    def begin(self, num_layers: int, n_prompt: int) -> _State:
        # An unresolved "auto" (no model id given) behaves like "online" with the paper's λ.
        lam = PAPER_LAMBDA if self.lam is None else self.lam
        if isinstance(self.pivot, int):
            if not 0 <= self.pivot < num_layers - 1:
                raise StructKVError(
                    f"pivot layer must be in [0, {num_layers - 2}] for this {num_layers}-layer "
                    f"model, got {self.pivot}"
                )
            return _State(Centrality(lam), self.pivot, None)
        lo, hi = search_range(num_layers)
        online = OnlinePivot(
            self.l_min if self.l_min is not None else lo,
            self.l_max if self.l_max is not None else hi,
            rule=self.rule,
            tau=self.tau,
            scales=self.scales,
        )
        return _State(Centrality(lam), None, online)

    def track(self, view: LayerView, state: _State) -> None:
        state.centrality.update(view.saliency)
        if state.online is not None and state.decided is None:
            state.decided = state.online.observe(view.metrics)

    def propagate(self, view: LayerView, state: _State) -> torch.Tensor | None:
        if state.fixed is not None:
            decided = view.layer == state.fixed
        else:
            decided = state.decided is not None
        if not decided:
            return None
        return self.select(state.centrality.value, budget(self.r_struct, view.prompt_len))

    def finish(self, state: _State, stats: PrefillStats) -> None:
        stats.lam = state.centrality.lam
        stats.pivot_rule = "fixed" if state.fixed is not None else self.rule


@dataclass
class StructKVPaper(StructKV):
    """The paper's preset: λ 0.9 and the online argmax pivot rule, no calibration."""

    name = "structkv-paper"

    lam: float | None = PAPER_LAMBDA
    pivot: int | str = "online"
    rule: str = "argmax"
