"""What the pack's layers of a model hold, for the format tests: the layers and a count per weight kind."""
from __future__ import annotations

from torch import nn

from ..core.formats.layers import PackedLayer


def packed_layers(model: nn.Module) -> dict[str, PackedLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLayer)}


def describe(model: nn.Module) -> dict[str, int]:
    """Count of the pack's layers per weight kind (``{"plain": 12, "Q4_K": 200}``)."""
    counts: dict[str, int] = {}
    for layer in packed_layers(model).values():
        counts[layer.weight_kind] = counts.get(layer.weight_kind, 0) + 1
    return counts
