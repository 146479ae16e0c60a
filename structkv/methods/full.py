"""Full context: no compression; the reference every other method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from structkv.methods.base import Method


@dataclass
class Full(Method):
    """Keeps every token in every layer; computes no saliency (no overhead)."""

    name = "full"
    needs_saliency = False

    def validate(self, n_prompt: int) -> None:
        if n_prompt < 1:
            super().validate(n_prompt)
