"""MRCS+ (the LEMS paper's strengthened baseline): mrcs's greedy search with LEMS's propagation bias and tuned
(α, γ).

Each layer's loss at a proposed rank is weighed by its block's d(b), so at every scheduled step the layer whose
biased loss is smallest gives up parameters; early blocks, whose errors propagate furthest, are shaved last.
(α, γ) are chosen by Optuna on the truncated model's KL (allocate/tune.py); the loss curves (measured or
spectral, as for mrcs) are computed once and shared by every trial.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from . import Allocation, AllocationProblem, allocator
from .common import fill_config, step_of
from .mrcs import MrcsConfig, _loss_fns, greedy_search
from .tune import BiasOptions, biased_search


@dataclass
class MrcsPlusConfig(MrcsConfig, BiasOptions):
    def check(self) -> None:
        super().check()
        self.check_bias("mrcs-plus")


@allocator("mrcs-plus", options=MrcsPlusConfig)
def mrcs_plus(p: AllocationProblem) -> Allocation:
    cfg = fill_config(MrcsPlusConfig, p.options, "mrcs-plus")
    step = step_of(p, cfg.rank_multiple)
    if p.ratio >= 1:
        return Allocation({name: None for name in p.shapes})
    loss, measure_s, probes = _loss_fns(p, cfg)
    t0 = time.perf_counter()

    def search(d):  # the greedy schedule over d(b)-weighted losses
        biased = {n: (lambda r, f=f, w=d[n]: w * f(r)) for n, f in loss.items()}
        return greedy_search(p, cfg, biased, step)[0]

    ranks, record = biased_search(p, cfg, search, "mrcs-plus")
    search_s = measure_s + time.perf_counter() - t0
    return Allocation(ranks, {"loss": cfg.loss, **record, "measure_s": round(measure_s, 2),
                              "search_s": round(search_s, 2),
                              "probes": probes + (record.get("trials") or 0), "rank_multiple": step})
