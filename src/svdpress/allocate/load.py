"""`--allocate load --ranks FILE.json`: reuse the ranks of a previous run (or another tool's, converted to the
svdpress-ranks/1 format of record.py). Layer names and shapes must match the model exactly; the ranks are
used as they are (no re-fitting), so they must fit the budget of --ratio (pass --ratio 1 to skip the check).

The budget is re-checked under the counting in force (classical, or PivGa's r·(m+n) − r² with `--pivga`), not the
one the file was made under: a file allocated with a PivGa budget holds ranks past the classical break-even, which
a classical build stores dense, so it usually breaks a classical budget of the same ratio; the reverse always fits
(PivGa counts every factored layer r² smaller). A breach is one message naming both countings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

from ..errors import SvdpressError
from ..params import CLASSICAL, Counting, LayerShape, dense_count
from . import Allocation, AllocationProblem, allocator
from .common import fill_config
from .record import read_counting, read_layers


@dataclass
class LoadConfig:
    ranks: Optional[str] = None  # path of a ranks.json

    def check(self) -> None:
        """The file is read and parsed now, before the model is loaded."""
        if not self.ranks:
            raise SvdpressError("--allocate load needs a rank file: --ranks FILE.json (or --opt ranks=FILE.json)")
        self.layers = read_layers(self.ranks)
        self.counting = read_counting(self.ranks)  # what the file says it was made under (None: not recorded)

    def check_model(self, shapes: Mapping[str, LayerShape], ratio: Optional[float] = None,
                    pivga: bool = False) -> None:
        """Layer names and shapes against the model's, as soon as its structure is known (before calibration);
        with `ratio` (< 1), also the budget under the counting in force (`pivga`)."""
        missing, extra = set(shapes) - set(self.layers), set(self.layers) - set(shapes)
        if missing or extra:
            raise SvdpressError(f"rank file {self.ranks} does not match the model's layers: "
                                + (f"missing {_names(missing)}" if missing else "")
                                + ("; " if missing and extra else "") + (f"unknown {_names(extra)}" if extra else ""))
        for name, (shape, r) in self.layers.items():
            s = shapes[name]
            if shape is not None and tuple(shape) != (s.m, s.n):
                raise SvdpressError(f"rank file {self.ranks}: layer {name} has shape {list(shape)} in the file but "
                                    f"[{s.m}, {s.n}] in the model")
            if r is not None and r > s.full_rank:
                raise SvdpressError(f"rank file {self.ranks}: layer {name} rank {r} exceeds its full rank "
                                    f"{s.full_rank}")
        if ratio is not None:
            self.check_budget(shapes, ratio, Counting(pivga))

    def ranks_for(self, shapes: Mapping[str, LayerShape]) -> dict[str, Optional[int]]:
        return {name: self.layers[name][1] for name in shapes}

    def check_budget(self, shapes: Mapping[str, LayerShape], ratio: float, counting: Counting) -> None:
        """The file's ranks counted under `counting` must fit floor(ratio · dense) (ratio 1: anything goes)."""
        if ratio >= 1:
            return
        ranks = self.ranks_for(shapes)
        dense = dense_count(shapes)
        kept = counting.total(shapes, ranks)
        if kept <= int(ratio * dense):
            return
        past = sum(r is not None and CLASSICAL.is_dense(shapes[n], r) for n, r in ranks.items())
        made = self.counting or ("pivga" if past else None)  # only a PivGa budget gives ranks past break-even
        msg = (f"rank file {self.ranks} keeps ratio {kept / dense:.4f} under {counting.describe()}, above --ratio "
               f"{ratio}")
        fix = f"pass a --ratio of at least {math.ceil(kept / dense * 1e4) / 1e4:.4f} (or 1)"  # rounded up: it fits
        if made is not None and made != counting.name:
            other = Counting(made == "pivga")
            msg += f": it was allocated under {other.describe()} (ratio {other.total(shapes, ranks) / dense:.4f})"
            if other.pivga:
                msg += f" and {past} of its layers are past the classical break-even, stored dense without PivGa"
                fix = "pass --pivga, or " + fix
        raise SvdpressError(f"{msg}; {fix}")


def _names(xs) -> str:
    xs = sorted(xs)
    return ", ".join(xs[:3]) + (f" (and {len(xs) - 3} more)" if len(xs) > 3 else "")


@allocator("load", options=LoadConfig)
def load(p: AllocationProblem) -> Allocation:
    cfg = fill_config(LoadConfig, p.options, "load")
    cfg.check_model(p.shapes, p.ratio, p.pivga)
    return Allocation(cfg.ranks_for(p.shapes), {"ranks_file": str(cfg.ranks), "file_budget_counting": cfg.counting})
