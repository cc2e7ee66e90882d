"""LEMS's propagation bias d(b) grafted onto a baseline allocator, with (α, γ) tuned by Optuna (ASVD+, MRCS+).

The LEMS paper's ablation asks whether its gains come from the error model or only from the depth bias: the
"+" baselines keep a baseline's own search (asvd-threshold's global threshold, mrcs's greedy schedule) but weigh
every layer's measured loss by d(b) = 1 + γ·(H(b) − H(L−1))/(H(0) − H(L−1)), H(b) = Σ_{k≥b} (k+1)^(−α)
(lems.depth_bias, the same function), and choose (α, γ) as the repository does: an Optuna study (TPE, seeded)
whose objective is the KL(dense ‖ truncated model) of the allocation each (α, γ) gives, α ∈ [0, 3],
γ ∈ [0, 7], 12 trials by default (the forwards `lems --opt tune=true` spends on its grid).

Optuna is optional (`pip install 'svdpress[tune]'`); it is looked for when the options are checked, before any
model is loaded, so a missing package is one clear error, not a traceback after calibration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from ..errors import SvdpressError
from . import AllocationProblem
from .common import block_index
from .lems import depth_bias
from .sensitivity import get_probe, probe_config

DEFAULT_TRIALS = 12  # = len(LemsConfig.tune_alphas) · len(LemsConfig.tune_gammas): lems's tuning budget


def require_optuna(method: str):
    """The optuna module, or a SvdpressError naming the extra that installs it."""
    try:
        import optuna
    except ImportError:
        raise SvdpressError(f"{method}: tuning (α, γ) needs Optuna, which is not installed: "
                            "pip install 'svdpress[tune]' (or --opt tune=false with fixed alpha and gamma)") from None
    return optuna


@dataclass
class BiasOptions:
    """The bias and tuning settings the "+" allocators add to their baseline's (a mixin of config fields)."""

    alpha: float = 0.0  # α of the harmonic bias (used as given when tune=false)
    gamma: float = 0.0  # γ: the first block's losses weigh 1 + γ, the last block's 1
    bias: str = "harmonic"  # harmonic | linear (d = L − b) | constant (d = 1: the baseline itself)
    tune: bool = True  # choose (α, γ) by Optuna on the truncated model's KL (harmonic bias only)
    n_trials: int = DEFAULT_TRIALS
    alpha_range: tuple[float, ...] = (0.0, 3.0)
    gamma_range: tuple[float, ...] = (0.0, 7.0)

    def check_bias(self, method: str) -> None:
        self.alpha_range = tuple(float(x) for x in self.alpha_range)
        self.gamma_range = tuple(float(x) for x in self.gamma_range)
        if self.bias not in ("harmonic", "linear", "constant"):
            raise SvdpressError(f"{method}: bias must be one of harmonic, linear, constant; got {self.bias!r}")
        if self.gamma < 0:
            raise SvdpressError(f"{method}: gamma must be ≥ 0 (d(b) = 1 + γ·…); got {self.gamma}")
        for name, rng in (("alpha_range", self.alpha_range), ("gamma_range", self.gamma_range)):
            if len(rng) != 2 or not rng[0] <= rng[1] or (name == "gamma_range" and rng[0] < 0):
                raise SvdpressError(f"{method}: {name} must be two numbers lo ≤ hi (gamma's ≥ 0); got {rng}")
        if self.n_trials < 1:
            raise SvdpressError(f"{method}: n_trials must be ≥ 1; got {self.n_trials}")
        if self.tunes:
            require_optuna(method)  # before any heavy work

    @property
    def tunes(self) -> bool:
        return self.tune and self.bias == "harmonic"


def depth_weights(p: AllocationProblem, cfg: BiasOptions, alpha: float, gamma: float) -> dict[str, float]:
    """{layer: d(block of the layer)} for this (α, γ)."""
    from dataclasses import replace

    blocks, n = block_index(p)
    c = replace(cfg, alpha=alpha, gamma=gamma)
    per_block = {b: depth_bias(b, n, c) for b in set(blocks.values())}
    return {name: per_block[b] for name, b in blocks.items()}


Search = Callable[[Mapping[str, float]], dict]  # depth weights -> {layer: rank or None}


def biased_search(p: AllocationProblem, cfg: BiasOptions, search: Search,
                  method: str) -> tuple[dict[str, Optional[int]], dict]:
    """Run `search` under d(b): once with the given (α, γ), or as an Optuna study over (α, γ) scored by the
    truncated model's KL (the study's best trial wins; ties go to the earlier trial). Returns the ranks and a
    record for the manifest."""
    if not cfg.tunes:
        return search(depth_weights(p, cfg, cfg.alpha, cfg.gamma)), {"alpha": cfg.alpha, "gamma": cfg.gamma,
                                                                     "bias": cfg.bias, "tuning": None}
    optuna = require_optuna(method)
    probe = get_probe(p, probe_config(cfg))
    t0 = time.perf_counter()
    results: dict[int, dict] = {}

    def objective(trial) -> float:
        a = trial.suggest_float("alpha", *cfg.alpha_range)
        g = trial.suggest_float("gamma", *cfg.gamma_range)
        ranks = search(depth_weights(p, cfg, a, g))
        kl = float(probe.loss(ranks)["kl"])
        results[trial.number] = {"alpha": a, "gamma": g, "kl": kl, "ranks": ranks}
        return kl

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one INFO line per trial otherwise
    try:
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=p.seed))
        study.optimize(objective, n_trials=cfg.n_trials)
    finally:
        optuna.logging.set_verbosity(verbosity)
    best = results[min(results, key=lambda k: (results[k]["kl"], k))]
    trials = {f"alpha={r['alpha']:.4g},gamma={r['gamma']:.4g}": r["kl"] for r in results.values()}
    return best["ranks"], {"alpha": best["alpha"], "gamma": best["gamma"], "bias": cfg.bias, "tuning": trials,
                           "tune_s": round(time.perf_counter() - t0, 2), "trials": len(results),
                           "sampler": f"optuna TPE (seed {p.seed})"}
