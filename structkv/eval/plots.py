"""Figures of the paper, redrawn from our own measurements (matplotlib, headless).

Figure 3: fidelity per layer · Figure 5: pivot metrics and T_l · Figures 6 and 7: heatmaps
(NIAH, decoupling) · Figure 8: prefill latency breakdown. Each writes one PNG, returns its path.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers / CI
import matplotlib.pyplot as plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pivot(entropy, sparsity, variance, transition, pivot, path: Path, title="") -> Path:
    """Per-layer metrics (each scaled to [0, 1]) and T_l, with the chosen pivot marked."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    layers = range(len(entropy))
    for name, values in (("entropy", entropy), ("sparsity", sparsity), ("variance", variance)):
        lo, hi = min(values), max(values)
        top.plot(layers, [(v - lo) / ((hi - lo) or 1) for v in values], marker=".", label=name)
    top.set_ylabel("scaled metric")
    top.legend(loc="best", fontsize=8)
    bottom.plot(layers, transition, marker=".", color="black", label="T_l")
    bottom.set_ylabel("transition score T_l")
    bottom.set_xlabel("layer")
    for ax in (top, bottom):
        if pivot is not None:
            ax.axvline(pivot, color="red", linestyle="--", linewidth=1)
    top.set_title(title or f"pivot L* = {pivot}")
    return _save(fig, path)


def plot_fidelity(curves: dict[str, list[float]], path: Path, title="") -> Path:
    """Last-token hidden-state cosine similarity with full context, per layer and method."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in curves.items():
        ax.plot(range(len(values)), values, marker=".", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine similarity to full")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def plot_grid(
    grid: dict[tuple, float], path: Path, xlabel: str, ylabel: str, title="", fmt=str
) -> Path:
    """Heatmap of a score in [0, 1] over (x, y) keys, e.g. (length, depth) or (R_struct, R_KV)."""
    xs = sorted({k[0] for k in grid})
    ys = sorted({k[1] for k in grid})
    data = [[grid.get((x, y), float("nan")) for x in xs] for y in ys]
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 2, 0.45 * len(ys) + 1.5))
    im = ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
    for j, row in enumerate(data):
        for i, value in enumerate(row):
            ax.text(i, j, f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(xs)), [fmt(x) for x in xs])
    ax.set_yticks(range(len(ys)), [fmt(y) for y in ys])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax, fraction=0.05)
    ax.set_title(title)
    return _save(fig, path)


def plot_latency(breakdown: dict[str, dict[str, float]], path: Path, title="") -> Path:
    """Stacked bars: prefill seconds per stage and method."""
    stages = []
    for parts in breakdown.values():
        stages += [s for s in parts if s not in stages]
    fig, ax = plt.subplots(figsize=(1.3 * len(breakdown) + 3, 4))
    bottom = [0.0] * len(breakdown)
    names = list(breakdown)
    for stage in stages:
        values = [breakdown[m].get(stage, 0.0) for m in names]
        ax.bar(names, values, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)
