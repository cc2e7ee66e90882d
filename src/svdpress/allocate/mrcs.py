"""MRCS / MemViT-style greedy rank search: shave the cheapest layer, one scheduled step at a time.

All layers start at break-even (dense). Step t removes Δ_t = τ(t−1) − τ(t) parameters, with the exponential
schedule τ(t) = N* + (N₀ − N*)·exp(−t/γ) (MemViT eq. 9; γ = 80 · steps/500 as in the LEMS repository's
port); every layer proposes r' = ⌊r − Δ_t/(m+n)⌋ (to the rank step, not below lower_bound·r_be) and the one
whose loss at r' is smallest takes it. The loss at any rank interpolates the measured sensitivity (the same
measurements as asvd-threshold: kept fractions 0.4 … 0.9, dnll), or the normalized tail energy of the
spectrum (`loss=energy`). Finally the budget is met to within one rank step (fill / trim).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..errors import SvdpressError
from ..params import count_params, layer_params
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
    fns = {}
    for name, shape in p.shapes.items():
        m = sens.metric(name, cfg.metric)
        xs, ys = np.array([*m.keys(), 1.0]), np.array([*m.values(), 0.0])
        fns[name] = lambda r, xs=xs, ys=ys, be=shape.break_even: float(np.interp(r / be, xs, ys))
    return fns, sens.seconds, sens.probes


@allocator("mrcs", options=MrcsConfig)
def mrcs(p: AllocationProblem) -> Allocation:
    cfg = fill_config(MrcsConfig, p.options, "mrcs")
    step = step_of(p, cfg.rank_multiple)
    if p.ratio >= 1:
        return Allocation({name: None for name in p.shapes})
    loss, measure_s, probes = _loss_fns(p, cfg)
    t0 = time.perf_counter()
    gamma = 80.0 * cfg.steps / 500
    rank = {n: s.break_even for n, s in p.shapes.items()}
    floor_rank = {n: max(step, math.ceil(cfg.lower_bound * s.break_even / step) * step) for n, s in p.shapes.items()}
    n0 = sum(s.m * s.n for s in p.shapes.values())
    tau = lambda t: p.target + (n0 - p.target) * math.exp(-t / gamma)  # noqa: E731
    current, t = count_params(p.shapes, rank), 1
    while current > p.target and t <= cfg.steps:
        delta = tau(t - 1) - tau(t)
        best, best_loss = None, math.inf
        for name, s in p.shapes.items():
            r_new = int(math.floor(rank[name] - delta / (s.m + s.n))) // step * step
            if r_new >= rank[name] or r_new < floor_rank[name]:
                continue
            v = loss[name](r_new)
            if v < best_loss:
                best, best_loss, best_rank = name, v, r_new
        if best is None:
            break
        current += layer_params(p.shapes[best], best_rank) - layer_params(p.shapes[best], rank[best])
        rank[best] = best_rank
        t += 1
    ranks = {n: (None if r >= p.shapes[n].break_even else r) for n, r in rank.items()}
    ranks = fit_budget(p, ranks, step, priority=lambda n: loss[n](max(step, rank[n] - step)))
    search_s = measure_s + time.perf_counter() - t0  # measurements counted even when cached
    return Allocation(ranks, {"iterations": t - 1, "loss": cfg.loss, "measure_s": round(measure_s, 2),
                              "search_s": round(search_s, 2),
                              "probes": probes, "rank_multiple": step})
