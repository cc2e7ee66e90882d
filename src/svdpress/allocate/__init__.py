"""Rank allocation: choose every layer's rank so the whole model meets one parameter target.

Every allocator takes an `AllocationProblem` and returns an `Allocation` ({layer: rank or None = dense}, plus
what it wants recorded). Methods register by name: `ALLOCATORS["uniform"]`. The budget is checked here, once,
with the same counting function that reports use.

The problem carries the counting its budget is met under (`pivga`: classical r·(m+n), or PivGa's r·(m+n) − r²,
whose identity block is free). Allocators price ranks, find break-even points and turn kept fractions into ranks
only through `problem.counting`, so every method spends a PivGa budget on rank without knowing it does; the
allocation records which counting was used (`budget_counting`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch

from ..errors import SvdpressError
from ..factorize import LayerSpectrum
from ..params import Counting, LayerShape, dense_count
from ..registry import Registry

if TYPE_CHECKING:
    from ..model import Runner


@dataclass
class AllocationProblem:
    shapes: dict[str, LayerShape]  # target layers, in model order
    spectra: Mapping[str, LayerSpectrum]  # a dict, or a SpectrumStore reading U, V from disk on access
    ratio: float  # kept / dense parameters of the target layers
    rank_multiple: int = 1
    options: dict[str, Any] = field(default_factory=dict)  # method-specific settings (--opt key=value)
    runner: Optional["Runner"] = None  # the dense model behind its runner, for methods that measure the model
    samples: Optional[torch.Tensor] = None  # calibration tokens (n, L)
    seed: int = 0
    progress: bool = True
    # measurements reusable across methods and ratios on the same model, spectra and samples (layer
    # sensitivities): pass one dict to several problems to share them (bench/allocation.py does)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    # count parameters as PivGa stores them (r·(m+n) − r²): every rank below min(m, n) is a factored candidate
    pivga: bool = False
    # called after each batch of measurements lands in `cache` (one kept fraction of every layer), so a caller
    # can keep them on disk as they come (bench/matrix.py does): a long probe interrupted is not all lost
    on_measured: Optional[Callable[[], None]] = field(default=None, repr=False, compare=False)

    @property
    def counting(self) -> Counting:
        """The parameter counting the budget is met under (see `svdpress.params`)."""
        return Counting(self.pivga)

    @property
    def device(self) -> torch.device:
        return self.runner.device if self.runner is not None else torch.device("cpu")

    @property
    def dense(self) -> int:
        return dense_count(self.shapes)

    @property
    def target(self) -> int:
        """Parameter budget of the target layers: floor(ratio · dense)."""
        return int(self.ratio * self.dense)


@dataclass
class Allocation:
    ranks: dict[str, Optional[int]]  # None = kept dense
    info: dict[str, Any] = field(default_factory=dict)  # method-specific record for the manifest


ALLOCATORS: Registry[Callable[[AllocationProblem], Allocation]] = Registry("allocation", __name__)
OPTIONS: dict[str, Optional[type]] = {}  # method → its settings dataclass (None: the method takes none)


def allocator(name: str, options: Optional[type] = None):
    """Register an allocation method and the dataclass of its `--opt` settings (checked before any work)."""
    def deco(fn):
        OPTIONS[name] = options
        return ALLOCATORS.register(name)(fn)
    return deco


def check_options(method: str, options: Mapping[str, Any]):
    """The method's settings filled from `--opt` (unknown keys and wrong types are errors naming the valid
    ones), or None for a method without settings. Runs before the model is loaded."""
    ALLOCATORS[method]  # an unknown method is a clear error (and every method module is imported)
    cls = OPTIONS.get(method)
    if cls is None:
        if options:
            raise SvdpressError(f"--allocate {method} takes no options; got {', '.join(sorted(options))}")
        return None
    from .common import fill_config

    return fill_config(cls, options, method)


def round_down(r: float, multiple: int) -> int:
    return int(r // multiple * multiple)


class Ranks(dict):
    """{layer: rank or None = dense}, remembering the counting it was allocated under, so that whatever records
    the ranks (ranks.json) prices them as the budget did."""

    def __init__(self, ranks: Mapping[str, Optional[int]] = (), counting: Counting = Counting()) -> None:
        super().__init__(ranks)
        self.counting = counting


def normalize(shapes: Mapping[str, LayerShape], ranks: Mapping[str, Optional[int]],
              counting: Counting = Counting()) -> Ranks:
    """Ranks at or past the counting's break-even become None (dense); every target layer gets an entry."""
    out = Ranks(counting=counting)
    for name, s in shapes.items():
        r = ranks.get(name)
        out[name] = None if counting.is_dense(s, r) else max(1, int(r))
    return out


def allocate(problem: AllocationProblem, method: str) -> Allocation:
    """Run an allocator and check that it met the budget (never above it) under the problem's counting, which the
    allocation's record names (`budget_counting`: classical | pivga)."""
    result = ALLOCATORS[method](problem)
    counting = problem.counting
    result.ranks = normalize(problem.shapes, result.ranks, counting)
    kept = counting.total(problem.shapes, result.ranks)
    if kept > problem.target and problem.ratio < 1:
        raise RuntimeError(f"allocator {method!r} exceeded the budget under {counting.describe()}: "
                           f"{kept} > {problem.target} parameters")
    result.info = {"budget_counting": counting.name, **result.info}
    return result


def check_ratio(ratio: float) -> float:
    if not (0 < ratio <= 1):
        raise SvdpressError(f"--ratio must be in (0, 1] (kept fraction of the linear-layer parameters); got {ratio}")
    return ratio
