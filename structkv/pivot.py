"""§3 Pivot statistics, the transition score T_l and the pivot rules (offline and online).

L* is the LAST layer that runs on the full sequence. The argmax search range is
[l_min, l_max - 1] so that L* = argmax + 1 never exceeds the compute cap l_max (method.md §6);
with that range the online rule below picks the same L* as the offline one whenever the score
rises to a single peak and then falls, and falls back to l_max exactly when the offline argmax is
the last layer of the range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

#: Weights of (-entropy, sparsity, variance) gradients in T_l (method.md §3).
DEFAULT_WEIGHTS = (0.2, 0.3, 0.5)
RULES = ("argmax", "stabilised")


def attention_metrics(
    attn: torch.Tensor, saliency: torch.Tensor, kappa: float = 0.1
) -> tuple[float, float, float]:
    """(entropy H_l, sparsity ρ_l, variance V_l) of one layer's window attention ``[H, w, n]``."""
    entropy, sparsity, variance = attention_metrics_tensor(attn, saliency, kappa).tolist()
    return entropy, sparsity, variance


def attention_metrics_tensor(
    attn: torch.Tensor, saliency: torch.Tensor, kappa: float = 0.1
) -> torch.Tensor:
    """The same three statistics as a ``[3]`` tensor (traceable: the engine graphs output it)."""
    n = attn.shape[-1]
    entropy = -torch.special.xlogy(attn, attn).sum(-1).mean()
    top = max(1, math.ceil(kappa * n - 1e-9))
    sparsity = attn.topk(top, dim=-1).values.sum(-1).mean()
    variance = (saliency / saliency.mean()).var(unbiased=False)
    return torch.stack([entropy, sparsity, variance])


def search_range(num_layers: int) -> tuple[int, int]:
    """Default [l_min, l_max] = [floor(0.2 L), floor(0.7 L)], with l_min >= 1 (T_0 is undefined)."""
    return max(1, int(0.2 * num_layers)), max(2, int(0.7 * num_layers))


def gradients(metrics: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """Signed layer-to-layer changes of (-H, ρ, V); entry 0 is zero (no previous layer)."""
    out = [(0.0, 0.0, 0.0)]
    for (h0, r0, v0), (h1, r1, v1) in zip(metrics, metrics[1:]):
        out.append((-(h1 - h0), r1 - r0, v1 - v0))
    return out


def metric_scales(metrics: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Offline per-metric scale: max |gradient| over all layers (1.0 where a metric never moves)."""
    grads = gradients(metrics)[1:]
    scales = []
    for i in range(3):
        m = max((abs(g[i]) for g in grads), default=0.0)
        scales.append(m if m > 0 else 1.0)
    return tuple(scales)


def transition_scores(
    metrics: list[tuple[float, float, float]],
    scales: tuple[float, float, float] | None = None,
    weights: tuple[float, float, float] = DEFAULT_WEIGHTS,
) -> list[float]:
    """T_l = Σ_i weight_i · grad_i(l) / scale_i; T_0 = 0 (never inside the search range)."""
    scales = scales or metric_scales(metrics)
    return [sum(w * g / s for w, g, s in zip(weights, grad, scales)) for grad in gradients(metrics)]


def offline_pivot(
    scores: list[float], l_min: int, l_max: int, rule: str = "argmax", tau: float = 0.2
) -> int:
    """L* from a full T series: argmax over [l_min, l_max-1], plus one ("argmax" rule), or the
    first later layer whose |T| <= tau * max|T| ("stabilised" rule, compress once it is over)."""
    if rule not in RULES:
        raise ValueError(f"unknown pivot rule {rule!r}; choose one of {RULES}")
    if not 1 <= l_min < l_max < len(scores):
        raise ValueError(f"bad pivot range [{l_min}, {l_max}] for {len(scores)} layers")
    peak = max(range(l_min, l_max), key=lambda i: (scores[i], -i))
    if rule == "argmax":
        return peak + 1
    limit = tau * max(abs(s) for s in scores[l_min : l_max + 1])
    for layer in range(peak + 1, l_max + 1):
        if abs(scores[layer]) <= limit:
            return layer
    return l_max


@dataclass
class OnlinePivot:
    """Decides L* while layers run, one layer of look-ahead (method.md §3).

    ``scales`` are the calibrated metric scales; without them the running max |gradient| is used.
    Call :meth:`observe` after each layer; it returns L* once decided, else None.
    """

    l_min: int
    l_max: int
    rule: str = "argmax"
    tau: float = 0.2
    scales: tuple[float, float, float] | None = None
    weights: tuple[float, float, float] = DEFAULT_WEIGHTS
    metrics: list[tuple[float, float, float]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    _peak_passed: bool = False

    def _score(self) -> float:
        grads = gradients(self.metrics)
        scales = self.scales or metric_scales(self.metrics)
        return sum(w * g / s for w, g, s in zip(self.weights, grads[-1], scales))

    def observe(self, metrics: tuple[float, float, float]) -> int | None:
        self.metrics.append(metrics)
        self.scores.append(self._score() if len(self.metrics) > 1 else 0.0)
        layer = len(self.metrics) - 1
        if layer <= self.l_min:
            return None
        window = self.scores[self.l_min : layer]
        prev = self.scores[layer - 1]
        if not self._peak_passed and prev >= max(window) and self.scores[layer] < prev:
            self._peak_passed = True
            if self.rule == "argmax":
                return layer
        if self._peak_passed and self.rule == "stabilised":
            limit = self.tau * max(abs(s) for s in self.scores[self.l_min : layer + 1])
            if abs(self.scores[layer]) <= limit:
                return layer
        if layer >= self.l_max:
            return self.l_max
        return None
