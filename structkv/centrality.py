"""§2 Global in-degree centrality, accumulated online: C^(l) = λ·C^(l-1) + S^(l).

One length-N vector whatever the depth, so memory is O(N). λ close to 1 lets the diffuse
attention of early layers dominate; calibration (§6) picks λ per model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Centrality:
    """Running C over the full-length layers; ``update`` once per layer, in order."""

    lam: float = 0.9
    value: torch.Tensor | None = field(default=None, repr=False)

    def update(self, saliency: torch.Tensor) -> torch.Tensor:
        """Fold in one layer's per-token saliency S^(l) (shape ``[n]``)."""
        self.value = saliency.clone() if self.value is None else self.lam * self.value + saliency
        return self.value
