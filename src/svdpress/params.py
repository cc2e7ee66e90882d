"""Parameter counting: the one function that allocation, reports and tests all use.

What is counted is what the papers count: the compressible linear layers of the decoder blocks (weights and
biases of q,k,v,o,gate,up,down). Embeddings and the LM head are reported separately by `model_params`.

A layer y = W x + b, W of shape (m, n), factored at rank r (W ≈ A·B, A: m×r, B: r×n) is counted in one of two ways:

* classical: r·(m+n), both factors stored;
* PivGa: r·(m+n) − r². Gauge fixing (`svdpress.pivga`) writes W = C·[I | D]·Pᵀ; the r×r identity is not stored,
  so the count is m·n − (m−r)·(n−r), below the dense m·n for every r < min(m, n).

A layer at or past the break-even rank of the counting in force stays dense and is counted dense: r·(m+n) ≥ m·n
classically, r ≥ min(m, n) with PivGa (where the two counts meet). `Counting` binds one of the two, so an
allocator asks its problem's counting and never decides by hand which one applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, TypeVar

import torch.nn as nn

R = TypeVar("R")  # int, float or a 0-d tensor: the smooth count of FermiGrad evaluates the same formula


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
        """Classical break-even rank ⌈m·n/(m+n)⌉; `break_even(shape, pivga)` gives either counting's."""
        return break_even(self)


def break_even(shape: LayerShape, pivga: bool = False) -> int:
    """Smallest rank at which factoring no longer saves parameters: r·(m+n) ≥ m·n, or with PivGa r = min(m, n)."""
    if pivga:
        return shape.full_rank
    return -(-shape.m * shape.n // (shape.m + shape.n))


def is_dense(shape: LayerShape, rank: Optional[int], pivga: bool = False) -> bool:
    """A layer is kept dense when it has no rank or its rank is at or past the break-even point."""
    return rank is None or rank >= break_even(shape, pivga)


def factored_params(shape: LayerShape, r: R, pivga: bool = False) -> R:
    """Weights of the factors at rank r, r·(m+n) (− r² with PivGa), bias excluded. `r` may be real or a tensor
    (FermiGrad's soft rank Σ_j F_j), which is why this is the formula and `layer_params` the integer count."""
    return r * (shape.m + shape.n) - (r * r if pivga else 0)


def layer_params(shape: LayerShape, rank: Optional[int], pivga: bool = False) -> int:
    """Parameters of one layer at `rank`: r·(m+n) (minus r² with PivGa's gauge fixing) + bias, or dense m·n."""
    if is_dense(shape, rank, pivga):
        return shape.dense
    return int(factored_params(shape, int(rank), pivga)) + (shape.m if shape.bias else 0)


def count_params(
    shapes: Mapping[str, LayerShape], ranks: Mapping[str, Optional[int]] | None = None, pivga: bool = False
) -> int:
    """Total parameters of the target layers given per-layer ranks (missing or None = dense)."""
    ranks = ranks or {}
    return sum(layer_params(s, ranks.get(name), pivga) for name, s in shapes.items())


def dense_count(shapes: Mapping[str, LayerShape]) -> int:
    return sum(s.dense for s in shapes.values())


def rank_for_params(shape: LayerShape, weights: float, pivga: bool = False) -> float:
    """The real rank whose factors hold `weights` parameters (bias excluded), the inverse of `factored_params` on
    [0, break-even]: weights/(m+n), or with PivGa the smaller root of r² − (m+n)·r + weights = 0."""
    s = shape.m + shape.n
    if not pivga:
        return weights / s
    disc = max(s * s - 4.0 * weights, 0.0)
    return (s - math.sqrt(disc)) / 2


@dataclass(frozen=True)
class Counting:
    """The parameter counting an allocation is made under: classical (r·(m+n)) or PivGa (r·(m+n) − r²).

    Every method of an allocator that prices a rank, asks whether a rank is dense, or turns a kept fraction into
    a rank goes through this object (`AllocationProblem.counting`), so the same allocator code serves both."""

    pivga: bool = False

    @property
    def name(self) -> str:
        return "pivga" if self.pivga else "classical"

    def describe(self) -> str:
        return "PivGa counting r·(m+n) − r²" if self.pivga else "classical counting r·(m+n)"

    def break_even(self, shape: LayerShape) -> int:
        return break_even(shape, self.pivga)

    def is_dense(self, shape: LayerShape, rank: Optional[int]) -> bool:
        return is_dense(shape, rank, self.pivga)

    def layer(self, shape: LayerShape, rank: Optional[int]) -> int:
        return layer_params(shape, rank, self.pivga)

    def total(self, shapes: Mapping[str, LayerShape], ranks: Mapping[str, Optional[int]] | None = None) -> int:
        return count_params(shapes, ranks, self.pivga)

    def factored(self, shape: LayerShape, r: R) -> R:
        return factored_params(shape, r, self.pivga)

    def rank_for(self, shape: LayerShape, weights: float) -> float:
        return rank_for_params(shape, weights, self.pivga)

    def rank_of_fraction(self, shape: LayerShape, fraction: float) -> float:
        """The real rank keeping `fraction` of the layer's weights: with PivGa the root of r·(m+n) − r² = f·m·n;
        classically f·r_be (the count is linear in r, so this is f·m·n/(m+n) up to the break-even's rounding,
        and it is the convention every classical allocation has used)."""
        if not self.pivga:
            return fraction * self.break_even(shape)
        return self.rank_for(shape, fraction * shape.m * shape.n)

    def fraction_of_rank(self, shape: LayerShape, r: float) -> float:
        """Inverse of `rank_of_fraction`: r/r_be classically, (r·(m+n) − r²)/(m·n) with PivGa."""
        if not self.pivga:
            return r / self.break_even(shape)
        return self.factored(shape, r) / (shape.m * shape.n)


CLASSICAL = Counting(False)
PIVGA = Counting(True)


def model_params(model: nn.Module) -> int:
    """All parameters of a module, counting tied tensors once (embeddings and LM head are often tied)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def uncompressible(model_total: int, shapes: Mapping[str, LayerShape]) -> int:
    """Parameters outside the target layers (embeddings, LM head, norms, layers not targeted)."""
    return model_total - dense_count(shapes)


def linear_ratio_for_model(ratio: float, model_total: int, shapes: Mapping[str, LayerShape],
                           pivga: bool = False) -> float:
    """`--budget-of model`: the ratio R counts every parameter, so the target layers may keep
    R·total − (uncompressible part), i.e. the linear ratio (R·total − other) / linear_dense. The smallest R
    possible keeps every target layer at rank 1: (other + Σ count at rank 1) / total; below it is an error."""
    from .errors import SvdpressError

    other = uncompressible(model_total, shapes)
    dense = dense_count(shapes)
    floor = other + count_params(shapes, {n: 1 for n in shapes}, pivga)
    if ratio * model_total < floor:
        smallest = math.ceil(floor / model_total * 1000) / 1000
        raise SvdpressError(f"--budget-of model --ratio {ratio}: the parameters outside the target layers "
                            f"(embeddings, LM head, norms: {other:,} of {model_total:,}) already take "
                            f"{other / model_total:.3f} of the model; the smallest ratio possible is {smallest} "
                            f"(every target layer at rank 1)")
    return min(1.0, (ratio * model_total - other) / dense)
