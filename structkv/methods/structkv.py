"""StructKV (§1–§5): centrality over depth, a dynamic pivot, propagation, decoupled KV.

``structkv`` reads the model's calibration profile (§6) for λ and the pivot; ``structkv-paper``
is the paper's preset (λ 0.9, online argmax rule) and is always reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from structkv.centrality import Centrality
from structkv.errors import StructKVError
from structkv.methods.base import SaliencyKVMethod
from structkv.pivot import RULES, OnlinePivot, search_range
from structkv.prefill import LayerView, PrefillStats
from structkv.selection import budget

PAPER_LAMBDA = 0.9
#: The paper's budgets: what ``structkv`` uses for a knob neither given nor calibrated.
PAPER_BUDGETS = {"r_struct": 0.2, "r_kv": 0.1, "window": 8, "pooling": 7, "chunk": 0}


def _is_layer(pivot: object) -> bool:
    return isinstance(pivot, int) and not isinstance(pivot, bool) and pivot >= 0


@dataclass
class _State:
    centrality: Centrality
    fixed: int | None
    online: OnlinePivot | None
    decided: int | None = None  # the online rule's L*, once observed
    # kv_evidence > 0: the full-length layers' K/V and saliency, chosen after the last layer
    deferred: list = field(default_factory=list)
    pivot_centrality: torch.Tensor | None = None  # C at the pivot, over all prompt tokens
    deep: torch.Tensor | None = None  # window attention the layers after the pivot pay [N]
    refined: bool = False  # the refine_layer compaction has been made


@dataclass
class StructKV(SaliencyKVMethod):
    """Compute budget ``r_struct`` (tokens propagated after the pivot) and memory budget ``r_kv``
    (tokens kept per layer and KV head) are separate knobs.

    ``lam``: centrality decay λ (None: from the profile). ``pivot``: "auto" (profile), "online"
    (detect with ``rule`` while layers run) or a fixed layer index, the last full-length layer.
    ``l_min``/``l_max``: pivot search range (default [0.2 L, 0.7 L]); ``tau``: threshold of the
    "stabilised" rule; ``scales``: metric scales for the online score (None: running max).
    ``kv_evidence`` β: 0 lets each layer before the pivot keep what its own window attention
    points at (§5); β > 0 chooses those layers' caches after the last layer, by their own
    saliency plus β times deeper evidence — the centrality at the pivot and the attention the
    layers after it pay each propagated token — because on shallow-salience models the needle
    becomes salient only deep in the network (docs/RESULTS.md). Torch path only.
    ``refine_layer`` / ``r_refine``: budgets that shrink with depth. After layer
    ``refine_layer`` (past the pivot) the propagated tokens are cut once more to the top
    ``r_refine`` · N by the centrality, which keeps accumulating over the propagated tokens. A
    shallow pivot with a loose R_struct and a deep refinement with a tight one costs less than
    one deep pivot, and the final choice is made where the needle has become salient (on
    SmolLM2 around layer 14, docs/RESULTS.md). None: no refinement. Engines export it as two
    more graphs (``refine``, ``post_refine``; :mod:`structkv.graphs`).
    """

    name = "structkv"

    # None: the calibration profile's budget (its "budgets"), else the paper's (PAPER_BUDGETS).
    window: int | None = None
    pooling: int | None = None
    chunk: int | None = None
    r_kv: float | None = None
    r_struct: float | None = None
    lam: float | None = None
    pivot: int | str = "auto"
    rule: str = "argmax"
    l_min: int | None = None
    l_max: int | None = None
    tau: float = 0.2
    scales: tuple[float, float, float] | None = None
    kv_evidence: float = 0.0
    refine_layer: int | None = None
    r_refine: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.scales, list):  # from JSON (manifest, profile)
            self.scales = tuple(self.scales)
        # Budgets left unset take the paper's values now (every code path sees numbers) and
        # remember that a calibration profile may replace them (with_profile).
        self._from_profile = frozenset(k for k in PAPER_BUDGETS if getattr(self, k) is None)
        for knob in self._from_profile:
            setattr(self, knob, PAPER_BUDGETS[knob])

    @property
    def from_profile(self) -> frozenset[str]:
        """Budget knobs the user left unset: a calibration profile's budgets may fill them."""
        return self._from_profile

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
        if not (
            isinstance(self.kv_evidence, (int, float))
            and not isinstance(self.kv_evidence, bool)
            and 0.0 <= self.kv_evidence < float("inf")
        ):
            raise StructKVError(
                f"kv_evidence must be a finite number >= 0, got {self.kv_evidence!r}; e.g. 1.0"
            )
        if (self.refine_layer is None) != (self.r_refine is None):
            raise StructKVError(
                "--refine-layer and --r-refine go together: pass both (e.g. --refine-layer 14 "
                "--r-refine 0.1) or neither"
            )
        if self.refine_layer is not None:
            if not _is_layer(self.refine_layer):
                raise StructKVError(
                    f"refine_layer must be a layer index >= 0, got {self.refine_layer!r}"
                )
            if self.r_refine >= self.r_struct:
                raise StructKVError(
                    f"--r-refine ({self.r_refine}) must be smaller than --r-struct "
                    f"({self.r_struct}): the refinement keeps a subset of the propagated tokens"
                )
            if _is_layer(self.pivot) and self.refine_layer <= self.pivot:
                raise StructKVError(
                    f"--refine-layer ({self.refine_layer}) must come after the pivot ({self.pivot})"
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
        if self.kv_evidence:
            raise StructKVError(
                f"--kv-evidence {self.kv_evidence}: engines choose each layer's cache as the "
                "layer runs; drop --kv-evidence for export (it is a torch-path option)"
            )
        if self.refine_layer is not None and self.r_kv > self.r_refine:
            raise StructKVError(
                f"--r-kv ({self.r_kv}) must not exceed --r-refine ({self.r_refine}) in an "
                "engine: layers after the refine layer only hold the refined tokens, and the "
                "paged cache keeps the same count in every layer"
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
        if self.refine_layer is not None and not self.pivot < self.refine_layer < num_layers - 1:
            raise StructKVError(
                f"--refine-layer must be in [{self.pivot + 1}, {num_layers - 2}] (after the "
                f"pivot, before the last layer) for this {num_layers}-layer model, got "
                f"{self.refine_layer}"
            )

    def with_profile(self, profile: dict | None) -> tuple[StructKV, str | None]:
        budgets = (profile or {}).get("budgets") or {}
        chosen = {k: budgets[k] for k in self._from_profile if k in budgets}
        if self.pivot != "auto":
            lam = self.lam if self.lam is not None else PAPER_LAMBDA
            return replace(self, lam=lam, **chosen), None
        if profile is None:
            note = (
                f"no calibration profile; using the paper preset (online argmax pivot, lambda "
                f"{PAPER_LAMBDA})"
            )
            lam = self.lam if self.lam is not None else PAPER_LAMBDA
            return replace(self, pivot="online", lam=lam), note
        scales = profile.get("metric_scales")
        if (
            budgets.get("refine_layer") is not None
            and "r_struct" in chosen
            and self.refine_layer is None
        ):
            # a two-stage schedule (calibrate --refine) comes whole: its R_struct is the first
            # cut's, which only fits the compute cap with the refinement
            chosen.update(refine_layer=budgets["refine_layer"], r_refine=budgets["r_refine"])
        return replace(
            self,
            **chosen,
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
        if self.kv_evidence > 0:
            state.pivot_centrality = state.centrality.value.clone()
        return self.select(state.centrality.value, budget(self.r_struct, view.prompt_len))

    # -- kv_evidence: the full-length layers' caches chosen with deeper evidence ---------------

    def defers_kv(self, view: LayerView, state: _State) -> bool:
        return self.kv_evidence > 0 and state.pivot_centrality is None

    def defer(self, index: int, view: LayerView, k, v, state: _State) -> None:
        state.deferred.append((index, k, v, view.saliency_heads, view.positions))

    def observe_compacted(self, view: LayerView, state: _State) -> None:
        if self.refine_layer is not None and view.saliency is not None and not state.refined:
            # C keeps folding over the propagated tokens; absent tokens only decay
            value = state.centrality.lam * state.centrality.value
            value[view.positions] += view.saliency
            state.centrality.value = value
        if self.kv_evidence > 0 and view.saliency is not None:
            if state.deep is None:
                state.deep = torch.zeros(view.prompt_len, device=view.saliency.device)
            state.deep[view.positions] += view.saliency.float()

    def resolve_deferred(self, state: _State, extra_capacity: int) -> list:
        from structkv.cache import LayerCache
        from structkv.selection import gather_tokens

        if not state.deferred:
            return []
        n = state.deferred[0][4].shape[0]
        cut = n - self.window  # the window is kept anyway: shares are over the other tokens

        def share(x: torch.Tensor) -> torch.Tensor:
            x = x.float()
            return x / x[..., :cut].sum(-1, keepdim=True).clamp_min(1e-12)

        evidence = torch.zeros(n, device=state.deferred[0][1].device)
        if state.pivot_centrality is not None:
            evidence += share(state.pivot_centrality)
        if state.deep is not None:
            evidence += share(state.deep)
        k_keep = budget(self.r_kv, n)
        out = []
        for index, k, v, saliency_heads, positions in state.deferred:
            keep = self.select(share(saliency_heads) + self.kv_evidence * evidence, k_keep)
            kept_k, kept_v = gather_tokens(k[0], keep)[None], gather_tokens(v[0], keep)[None]
            cache = LayerCache.from_kept(kept_k, kept_v, positions[keep], extra_capacity)
            out.append((index, cache))
        state.deferred = []
        return out

    def refine(self, view: LayerView, state: _State) -> torch.Tensor | None:
        if self.refine_layer is None or view.layer != self.refine_layer or state.refined:
            return None
        state.refined = True
        k = budget(self.r_refine, view.prompt_len)
        return self.select(state.centrality.value[view.positions], k)

    def finish(self, state: _State, stats: PrefillStats) -> None:
        stats.lam = state.centrality.lam
        stats.pivot_rule = "fixed" if state.fixed is not None else self.rule


@dataclass
class StructKVPaper(StructKV):
    """The paper's preset: λ 0.9 and the online argmax pivot rule, no calibration."""

    name = "structkv-paper"

    # the paper's budgets as plain defaults: a profile never changes the preset
    window: int | None = PAPER_BUDGETS["window"]
    pooling: int | None = PAPER_BUDGETS["pooling"]
    chunk: int | None = PAPER_BUDGETS["chunk"]
    r_kv: float | None = PAPER_BUDGETS["r_kv"]
    r_struct: float | None = PAPER_BUDGETS["r_struct"]
    lam: float | None = PAPER_LAMBDA
    pivot: int | str = "online"
    rule: str = "argmax"
