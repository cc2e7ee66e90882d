"""ATP (Huang et al., ICML 2025) adapted to ranks: kept fractions decreasing linearly with depth.

Block b keeps c_b = c + β·(1/2 − b/(L−1)) of its parameters (c = the target ratio): early blocks, whose errors
travel through the whole network, keep more. β is chosen on a grid of `beta_steps`+1 values in
[0, 2·min(c, 1−c)] by the measured loss (dnll, as the LEMS repository's port uses perplexity) of the whole
truncated model on calibration text; each candidate is first fitted to the budget (to within one rank step,
deeper layers trimmed first) so the candidates compare at equal size. Fractions become ranks, and parameters are
counted, under the problem's counting (classical or PivGa).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .. import distributed as dist
from ..errors import SvdpressError
from . import Allocation, AllocationProblem, allocator
from .common import block_index, fill_config, fit_budget, rank_at, step_of
from .sensitivity import get_probe, probe_config


@dataclass
class AtpConfig:
    beta_steps: int = 10
    metric: str = "dnll"  # dnll | kl
    rank_multiple: int | None = None
    probe_samples: int = 4
    probe_seqlen: int = 256
    probe_temperature: float = 0.6

    def check(self) -> None:
        if self.beta_steps < 0 or self.metric not in ("dnll", "kl"):
            raise SvdpressError("atp: beta_steps ≥ 0, metric dnll or kl")


def atp_ranks(p: AllocationProblem, beta: float, step: int) -> dict:
    """c_b = c + β·(1/2 − b/(L−1)) per block, as ranks fitted to the budget."""
    blocks, nblocks = block_index(p)
    last = max(nblocks - 1, 1)
    ranks = {n: rank_at(s, p.ratio + beta * (0.5 - blocks[n] / last), step, p.counting)
             for n, s in p.shapes.items()}
    return fit_budget(p, ranks, step, priority=lambda n: -blocks[n])


@allocator("atp", options=AtpConfig)
def atp(p: AllocationProblem) -> Allocation:
    cfg = fill_config(AtpConfig, p.options, "atp")
    step = step_of(p, cfg.rank_multiple)
    if p.ratio >= 1:
        return Allocation({name: None for name in p.shapes})
    t0 = time.perf_counter()
    probe = get_probe(p, probe_config(cfg))
    headroom = min(p.ratio, 1 - p.ratio)
    betas = [2 * headroom * i / max(cfg.beta_steps, 1) for i in range(cfg.beta_steps + 1)]
    candidates = [atp_ranks(p, beta, step) for beta in betas]
    losses = dist.map_items(candidates, lambda r: probe.loss(r)[cfg.metric], what="atp probes")  # across ranks
    tried = list(zip(losses, betas, candidates))
    loss, beta, ranks = min(tried, key=lambda x: x[0])
    seconds = time.perf_counter() - t0
    return Allocation(ranks, {"beta": beta, "loss": loss, "metric": cfg.metric, "probes": len(betas),
                              "losses": {round(b, 4): l for l, b, _ in tried}, "search_s": round(seconds, 2),
                              "rank_multiple": step})
