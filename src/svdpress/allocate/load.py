"""`--allocate load --ranks FILE.json`: reuse the ranks of a previous run (or another tool's, converted to the
svdpress-ranks/1 format of record.py). Layer names and shapes must match the model exactly; the ranks are
used as they are (no re-fitting), so they must fit the budget of --ratio (pass --ratio 1 to skip the check).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import SvdpressError
from ..params import count_params, dense_count
from . import Allocation, AllocationProblem, allocator
from .common import fill_config
from .record import read_layers


@dataclass
class LoadConfig:
    ranks: Optional[str] = None  # path of a ranks.json

    def check(self) -> None:
        """The file is read and parsed now, before the model is loaded."""
        if not self.ranks:
            raise SvdpressError("--allocate load needs a rank file: --ranks FILE.json (or --opt ranks=FILE.json)")
        self.layers = read_layers(self.ranks)

    def check_model(self, shapes) -> None:
        """Layer names and shapes against the model's, as soon as its structure is known (before calibration)."""
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


def _names(xs) -> str:
    xs = sorted(xs)
    return ", ".join(xs[:3]) + (f" (and {len(xs) - 3} more)" if len(xs) > 3 else "")


@allocator("load", options=LoadConfig)
def load(p: AllocationProblem) -> Allocation:
    cfg = fill_config(LoadConfig, p.options, "load")
    cfg.check_model(p.shapes)
    ranks = {name: cfg.layers[name][1] for name in p.shapes}
    kept = count_params(p.shapes, ranks)
    if p.ratio < 1 and kept > p.target:
        raise SvdpressError(f"rank file {cfg.ranks} keeps ratio {kept / dense_count(p.shapes):.4f}, above --ratio "
                            f"{p.ratio}; pass a --ratio at least that large (or 1)")
    return Allocation(ranks, {"ranks_file": str(cfg.ranks)})
