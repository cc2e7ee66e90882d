"""ASVD+ (the LEMS paper's strengthened baseline): asvd-threshold with LEMS's propagation bias and tuned (α, γ).

Every measured loss of layer l truncated to kept fraction f is weighed by its block's d(b) before ASVD's global
threshold is searched, so errors made early (which pass through more blocks) are spent last. (α, γ) are chosen
by Optuna on the truncated model's KL (allocate/tune.py); the measurements are asvd-threshold's, made once and
shared by every trial, so a trial costs one search and one forward of the truncated model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from . import Allocation, AllocationProblem, allocator
from .asvd_threshold import AsvdThresholdConfig, threshold_search
from .common import fill_config, step_of
from .sensitivity import layer_sensitivity, probe_config
from .tune import BiasOptions, biased_search


@dataclass
class AsvdPlusConfig(AsvdThresholdConfig, BiasOptions):
    def check(self) -> None:
        super().check()
        self.check_bias("asvd-plus")


@allocator("asvd-plus", options=AsvdPlusConfig)
def asvd_plus(p: AllocationProblem) -> Allocation:
    cfg = fill_config(AsvdPlusConfig, p.options, "asvd-plus")
    step = step_of(p, cfg.rank_multiple)
    if p.ratio >= 1:
        return Allocation({name: None for name in p.shapes})
    sens = layer_sensitivity(p, cfg.fractions, probe_config(cfg))
    loss = {n: {f: v[cfg.metric] for f, v in d.items()} for n, d in sens.loss.items()}
    t0 = time.perf_counter()

    def search(d):  # ASVD's threshold over d(b)-weighted losses
        return threshold_search(p, {n: {f: d[n] * v for f, v in fl.items()} for n, fl in loss.items()}, step)[0]

    ranks, record = biased_search(p, cfg, search, "asvd-plus")
    search_s = sens.seconds + time.perf_counter() - t0
    return Allocation(ranks, {"metric": cfg.metric, **record, "measure_s": round(sens.seconds, 2),
                              "search_s": round(search_s, 2),
                              "probes": sens.probes + (record.get("trials") or 0), "rank_multiple": step})
