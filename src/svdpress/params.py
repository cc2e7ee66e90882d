"""Parameter counting: the one function that allocation, reports and tests all use.

What is counted is what the papers count: the compressible linear layers of the decoder blocks (weights and
biases of q,k,v,o,gate,up,down). Embeddings and the LM head are reported separately by `model_params`.
A layer whose rank reaches the break-even point r·(m+n) ≥ m·n stays dense and is counted dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch.nn as nn


@dataclass(frozen=True)
class LayerShape:
    """Shape of one target linear layer: y = W x + b with W of shape (m, n)."""

    m: int  # out_features
    n: int  # in_features
    bias: bool = False

    @property
    def full_rank(self) -> int:
        return min(self.m, self.n)

    @property
    def dense(self) -> int:
        return self.m * self.n + (self.m if self.bias else 0)

    @property
    def break_even(self) -> int:
        """Smallest rank at which factoring no longer saves parameters: r·(m+n) ≥ m·n."""
        return -(-self.m * self.n // (self.m + self.n))


def is_dense(shape: LayerShape, rank: Optional[int]) -> bool:
    """A layer is kept dense when it has no rank or its rank is at or past the break-even point."""
    return rank is None or rank >= shape.break_even


def layer_params(shape: LayerShape, rank: Optional[int], pivga: bool = False) -> int:
    """Parameters of one layer at `rank`: r·(m+n) (minus r² with PivGa's gauge fixing) + bias, or dense m·n."""
    if is_dense(shape, rank):
        return shape.dense
    r = int(rank)
    return r * (shape.m + shape.n) - (r * r if pivga else 0) + (shape.m if shape.bias else 0)


def count_params(
    shapes: Mapping[str, LayerShape], ranks: Mapping[str, Optional[int]] | None = None, pivga: bool = False
) -> int:
    """Total parameters of the target layers given per-layer ranks (missing or None = dense)."""
    ranks = ranks or {}
    return sum(layer_params(s, ranks.get(name), pivga) for name, s in shapes.items())


def dense_count(shapes: Mapping[str, LayerShape]) -> int:
    return sum(s.dense for s in shapes.values())


def model_params(model: nn.Module) -> int:
    """All parameters of a module, counting tied tensors once (embeddings and LM head are often tied)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
