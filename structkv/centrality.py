"""§2 Global in-degree centrality, accumulated online: C^(l) = λ·C^(l-1) + S^(l).

One length-N vector whatever the depth, so memory is O(N). λ close to 1 lets the diffuse
attention of early layers dominate; calibration (§6) picks λ per model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def accumulate(previous: torch.Tensor | None, saliency: torch.Tensor, lam: float) -> torch.Tensor:
    """One step of C^(l) = λ·C^(l-1) + S^(l) (C^(0) = S^(0)): the torch methods, calibration and
    the exported ``pre_pivot`` graph all fold centrality through this function."""
    return saliency.clone() if previous is None else lam * previous + saliency


@dataclass
class Centrality:
    """Running C over the full-length layers; ``update`` once per layer, in order."""

    lam: float = 0.9
    value: torch.Tensor | None = field(default=None, repr=False)

    def update(self, saliency: torch.Tensor) -> torch.Tensor:
        """Fold in one layer's per-token saliency S^(l) (shape ``[n]``)."""
        self.value = accumulate(self.value, saliency, self.lam)
        return self.value
