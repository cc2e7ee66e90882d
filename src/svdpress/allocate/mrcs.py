"""MRCS / MemViT-style greedy rank search: shave the cheapest layer, one scheduled step at a time.

All layers start at break-even (dense). Step t removes Δ_t = τ(t−1) − τ(t) parameters, with the exponential
schedule τ(t) = N* + (N₀ − N*)·exp(−t/γ) (MemViT eq. 9; γ = 80 · steps/500 as in the LEMS repository's
port); every layer proposes the rank r' whose factors hold Δ_t fewer parameters, ⌊r − Δ_t/(m+n)⌋ classically
(to the rank step, not below the rank keeping lower_bound of the layer), and the one whose loss at r' is
smallest takes it. Ranks, break-even points and fractions follow the problem's counting (classical or PivGa). The loss at any rank interpolates the measured sensitivity (the same
measurements as asvd-threshold: kept fractions 0.4 … 0.9, dnll), or the normalized tail energy of the
spectrum (`loss=energy`). Finally the budget is met to within one rank step (fill / trim).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..errors import SvdpressError
from . import Allocation, AllocationProblem, allocator
from .common import fill_config, fit_budget, step_of
from .sensitivity import layer_sensitivity, probe_config


@dataclass
class MrcsConfig:
    loss: str = "measured"  # measured (interpolated sensitivity) | energy (Σ_{j≥r} S_j / Σ S_j, no forwards)
    fractions: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    metric: str = "dnll"
    lower_bound: float = 0.3  # smallest kept fraction of a layer
    steps: int = 2000
    rank_multiple: int | None = None
    probe_samples: int = 4
    probe_seqlen: int = 256
    probe_temperature: float = 0.6

    def check(self) -> None:
        self.fractions = tuple(float(f) for f in self.fractions)
        if self.loss not in ("measured", "energy") or self.metric not in ("dnll", "kl") or self.steps < 1:
            raise SvdpressError("mrcs: loss measured|energy, metric dnll|kl, steps ≥ 1")


def _loss_fns(p: AllocationProblem, cfg: MrcsConfig):
    """name → (rank → loss)."""
    if cfg.loss == "energy":
        fns = {}
        for name in p.shapes:
            cs = np.cumsum(p.spectra[name].S.double().numpy())
            fns[name] = lambda r, cs=cs: float(1 - cs[r - 1] / cs[-1])
        return fns, 0.0, 0
    sens = layer_sensitivity(p, cfg.fractions, probe_config(cfg))
    counting, fns = p.counting, {}
    for name, shape in p.shapes.items():
        m = sens.metric(name, cfg.metric)
        xs, ys = np.array([*m.keys(), 1.0]), np.array([*m.values(), 0.0])
        fns[name] = lambda r, xs=xs, ys=ys, s=shape: float(np.interp(counting.fraction_of_rank(s, r), xs, ys))
    return fns, sens.seconds, sens.probes


def greedy_search(p: AllocationProblem, cfg: MrcsConfig, loss, step: int):
    """The scheduled greedy shaving over loss functions {layer: rank → loss}: the ranks (budget met) and the
    number of steps taken."""
    gamma = 80.0 * cfg.steps / 500
    counting = p.counting
    rank = {n: counting.break_even(s) for n, s in p.shapes.items()}
    floor_rank = {n: max(step, math.ceil(counting.rank_of_fraction(s, cfg.lower_bound) / step) * step)
                  for n, s in p.shapes.items()}
    n0 = sum(s.m * s.n for s in p.shapes.values())
    tau = lambda t: p.target + (n0 - p.target) * math.exp(-t / gamma)  # noqa: E731
    current, t = counting.total(p.shapes, rank), 1
    while current > p.target and t <= cfg.steps:
        delta = tau(t - 1) - tau(t)
        best, best_loss = None, math.inf
        for name, s in p.shapes.items():
            # the rank whose factors hold Δ_t fewer parameters: r − Δ_t/(m+n) classically
            r_new = int(math.floor(counting.rank_for(s, counting.factored(s, rank[name]) - delta))) // step * step
            if r_new >= rank[name] or r_new < floor_rank[name]:
                continue
            v = loss[name](r_new)
            if v < best_loss:
                best, best_loss, best_rank = name, v, r_new
        if best is None:
            break
        current += counting.layer(p.shapes[best], best_rank) - counting.layer(p.shapes[best], rank[best])
        rank[best] = best_rank
        t += 1
    ranks = {n: (None if counting.is_dense(p.shapes[n], r) else r) for n, r in rank.items()}
    ranks = fit_budget(p, ranks, step, priority=lambda n: loss[n](max(step, rank[n] - step)))
    return ranks, t - 1


@allocator("mrcs", options=MrcsConfig)
def mrcs(p: AllocationProblem) -> Allocation:
    cfg = fill_config(MrcsConfig, p.options, "mrcs")
    step = step_of(p, cfg.rank_multiple)
    if p.ratio >= 1:
        return Allocation({name: None for name in p.shapes})
    loss, measure_s, probes = _loss_fns(p, cfg)
    t0 = time.perf_counter()
    ranks, iterations = greedy_search(p, cfg, loss, step)
    search_s = measure_s + time.perf_counter() - t0  # measurements counted even when cached
    return Allocation(ranks, {"iterations": iterations, "loss": cfg.loss, "measure_s": round(measure_s, 2),
                              "search_s": round(search_s, 2),
                              "probes": probes, "rank_multiple": step})
