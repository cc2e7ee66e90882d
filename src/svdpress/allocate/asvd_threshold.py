"""ASVD's sensitivity-threshold allocation (Yuan et al., 2023): one global threshold on measured sensitivity.

Every layer is truncated alone to each candidate kept fraction f (default 0.4 … 0.9 of its parameters, under the
problem's counting: with PivGa these are higher ranks) and
the loss change is measured (dnll = Δ log-perplexity on calibration text, the order of ASVD's perplexity).
All (layer, f, loss) triples are sorted by loss; a binary search finds the largest threshold such that
applying every triple below it (each layer at the smallest f it was allowed) meets the ratio. The rest of
the budget (less than one triple's worth) is then filled one rank step at a time, most sensitive layers first.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import Allocation, AllocationProblem, allocator
from .common import fill_config, fit_budget, rank_at, step_of
from .sensitivity import layer_sensitivity, probe_config


@dataclass
class AsvdThresholdConfig:
    fractions: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # kept fractions where loss is measured
    metric: str = "dnll"  # dnll (perplexity change) | kl
    rank_multiple: int | None = None  # default: --rank-multiple
    probe_samples: int = 4
    probe_seqlen: int = 256
    probe_temperature: float = 0.6

    def check(self) -> None:
        from ..errors import SvdpressError

        self.fractions = tuple(float(f) for f in self.fractions)
        if not self.fractions or not all(0 < f < 1 for f in self.fractions) or self.metric not in ("dnll", "kl"):
            raise SvdpressError("asvd-threshold: fractions must lie in (0, 1); metric dnll or kl")


def _apply(p: AllocationProblem, triples: list[tuple[str, float, float]], step: int) -> dict:
    """Each layer at the smallest fraction among the applied triples (others dense)."""
    frac: dict[str, float] = {}
    for name, f, _ in triples:
        frac[name] = min(frac.get(name, 1.0), f)
    return {name: rank_at(s, frac.get(name, 1.0), step, p.counting) for name, s in p.shapes.items()}


def threshold_search(p: AllocationProblem, loss: dict[str, dict[float, float]], step: int):
    """ASVD's search over measured losses {layer: {kept fraction: loss}}: the ranks (budget met) and the threshold."""
    triples = sorted(((n, f, v) for n, d in loss.items() for f, v in d.items()),
                     key=lambda t: -t[2])  # most harmful first
    lo, hi, best = 0, len(triples) - 1, 0
    while lo <= hi:  # largest start index whose tail (the least harmful triples) still meets the ratio
        mid = (lo + hi) // 2
        if p.counting.total(p.shapes, _apply(p, triples[mid:], step)) <= p.target:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    ranks = _apply(p, triples[best:], step)
    worst = {n: max(d.values()) for n, d in loss.items()}
    ranks = fit_budget(p, ranks, step, priority=worst.get)
    return ranks, (triples[best][2] if triples else None)


@allocator("asvd-threshold", options=AsvdThresholdConfig)
def asvd_threshold(p: AllocationProblem) -> Allocation:
    cfg = fill_config(AsvdThresholdConfig, p.options, "asvd-threshold")
    step = step_of(p, cfg.rank_multiple)
    if p.ratio >= 1:
        return Allocation({name: None for name in p.shapes})
    sens = layer_sensitivity(p, cfg.fractions, probe_config(cfg))
    loss = {n: {f: v[cfg.metric] for f, v in d.items()} for n, d in sens.loss.items()}
    ranks, threshold = threshold_search(p, loss, step)
    return Allocation(ranks, {"threshold": threshold, "metric": cfg.metric, "measure_s": round(sens.seconds, 2),
                              "search_s": round(sens.seconds, 2), "probes": sens.probes, "rank_multiple": step})
