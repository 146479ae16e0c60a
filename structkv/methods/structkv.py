"""StructKV (§1–§5): centrality over depth, a dynamic pivot, propagation, decoupled KV.

``structkv`` reads the model's calibration profile (§6) for λ and the pivot; ``structkv-paper``
is the paper's preset (λ 0.9, online argmax rule) and is always reported beside it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch

from structkv.centrality import Centrality
from structkv.errors import StructKVError
from structkv.methods.base import SaliencyKVMethod
from structkv.pivot import RULES, OnlinePivot, search_range
from structkv.prefill import LayerView, PrefillStats
from structkv.profile import find_profile
from structkv.selection import budget, topk_with_window

PAPER_LAMBDA = 0.9


@dataclass
class _State:
    centrality: Centrality
    fixed: int | None
    online: OnlinePivot | None


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

    def check_knobs(self) -> None:
        super().check_knobs()
        if self.lam is not None and not 0.0 <= self.lam <= 1.0:
            raise StructKVError(f"lambda must be in [0, 1], got {self.lam!r}")
        if self.rule not in RULES:
            raise StructKVError(
                f"unknown pivot rule {self.rule!r}; choose one of {', '.join(RULES)}"
            )
        if not (self.pivot in ("auto", "online") or isinstance(self.pivot, int)):
            raise StructKVError(f"pivot must be auto, online or a layer index, got {self.pivot!r}")

    def resolve(self, model_id: str) -> StructKV:
        if self.pivot != "auto":
            return self if self.lam is not None else replace(self, lam=PAPER_LAMBDA)
        profile = find_profile(model_id)
        if profile is None:
            print(
                f"[structkv] no calibration profile for {model_id}; using the paper preset "
                f"(online argmax pivot, lambda {PAPER_LAMBDA}). Run `structkv calibrate --model "
                f"{model_id}` for a calibrated one.",
                file=sys.stderr,
            )
            return replace(
                self, pivot="online", lam=self.lam if self.lam is not None else PAPER_LAMBDA
            )
        scales = profile.get("metric_scales")
        return replace(
            self,
            lam=self.lam if self.lam is not None else profile["lambda"],
            pivot=profile["pivot"],
            rule=profile.get("rule") or self.rule,
            scales=tuple(scales) if scales else None,
            l_min=self.l_min if self.l_min is not None else profile.get("l_min"),
            l_max=self.l_max if self.l_max is not None else profile.get("l_max"),
        )

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

    def propagate(self, view: LayerView, state: _State) -> torch.Tensor | None:
        centrality = state.centrality.update(view.saliency)
        if state.fixed is not None:
            decided = view.layer == state.fixed
        else:
            decided = state.online.observe(view.metrics) is not None
        if not decided:
            return None
        scores = self.pool(centrality)
        return topk_with_window(scores, budget(self.r_struct, view.prompt_len), self.window)

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
