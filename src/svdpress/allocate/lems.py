"""LEMS (Thoma et al., ICML 2026): a layer-wise error model solved as an integer linear program.

For layer l in block b and candidate rank r (multiples of the rank step, r(min_fraction) ≤ r < r_be, with r(f)
the rank keeping f of the layer's weights and r_be the break-even rank, both under the problem's counting: with
PivGa every rank below min(m, n) is a candidate) the surrogate error is

    e_l(r) = d(b) · G_l · T_l(r) / T_l(r_p)          with T_l(r) = Σ_{j≥r} S_j² / Σ_j S_j²

* local error T_l: the normalized tail energy of the layer's own (whitened) spectrum: the shape of the
  error curve, free to compute for every rank;
* global importance G_l: KL(dense ‖ model with layer l alone truncated to the probe rank r_p = ⌊p · r_be⌋)
  on a few calibration sequences (one probe per layer): calibrates the curve's scale, T_l(r_p)/T_l(r_p) = 1;
* propagation bias d(b) = 1 + γ · (H(b) − H(L−1)) / (H(0) − H(L−1)), H(b) = Σ_{k=b}^{L−1} (k+1)^(−α)
  (the repository's "harmonicv2"): errors made early pass through more blocks, so they weigh up to 1 + γ.

Then one rank (or dense, error 0) per layer minimizing Σ e subject to Σ params ≤ budget: a multiple-choice
knapsack, solved exactly as an ILP with HiGHS through scipy.optimize.milp (one-hot binaries per layer).
The paper's defaults: p = 0.1, α = 0, γ = 5, τ = 0.6, ranks in multiples of 16 (here: the `rank_multiple`
option, else `--rank-multiple` when it is not 1, else 16). The repository then tunes (α, γ) with 10 Optuna
trials scored by the truncated model's KL; `--opt tune=true` does the same on a small grid (12 forwards).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from .. import distributed as dist
from ..errors import SvdpressError
from . import Allocation, AllocationProblem, allocator
from .common import block_index, candidate_ranks, fill_config, rank_at
from .sensitivity import get_probe, layer_sensitivity, probe_config

DEFAULT_STEP = 16


@dataclass
class LemsConfig:
    probe_fraction: float = 0.1  # p: probe rank r_p = ⌊r(p)⌋ (classically ⌊p · r_be⌋) where G_l is measured
    alpha: float = 0.0  # α of the harmonic propagation bias
    gamma: float = 5.0  # γ: the first block's errors weigh 1 + γ, the last block's 1
    bias: str = "harmonic"  # harmonic | linear (d = L − b) | constant (d = 1)
    min_fraction: Optional[float] = None  # smallest kept fraction of a layer (None: 0.3, or 0.1 below ratio 0.5)
    rank_multiple: Optional[int] = None  # candidate rank step (None: --rank-multiple if not 1, else 16)
    global_importance: bool = True  # False: local error only (ablation)
    tune: bool = False  # choose (α, γ) on the grid below by the whole truncated model's KL (+1 forward each)
    tune_alphas: tuple[float, ...] = (0.0, 1.0, 3.0)
    tune_gammas: tuple[float, ...] = (0.0, 2.5, 5.0, 7.0)
    time_limit: float = 120.0  # HiGHS seconds
    mip_rel_gap: float = 1e-6  # HiGHS relative optimality gap at which it stops
    probe_samples: int = 4
    probe_seqlen: int = 256
    probe_temperature: float = 0.6

    def check(self) -> None:
        if not 0 < self.probe_fraction < 1:
            raise SvdpressError("lems: probe_fraction must be in (0, 1)")
        if self.gamma < 0 or self.bias not in ("harmonic", "linear", "constant"):
            raise SvdpressError("lems: gamma must be ≥ 0 and bias one of harmonic, linear, constant")


def depth_bias(block: int, blocks: int, cfg: LemsConfig) -> float:
    """d(b): harmonic 1 + γ·(H(b) − H(L−1))/(H(0) − H(L−1)); linear L − b; constant 1."""
    if cfg.bias == "constant" or blocks < 2:
        return 1.0
    if cfg.bias == "linear":
        return float(blocks - block)
    h = np.cumsum(((np.arange(blocks) + 1.0) ** -cfg.alpha)[::-1])[::-1]  # h[b] = Σ_{k≥b} (k+1)^-α
    return 1.0 + cfg.gamma * (h[block] - h[-1]) / max(h[0] - h[-1], 1e-12)


def tail_fraction(S2_cum: np.ndarray, r: int) -> float:
    """T(r) = Σ_{j≥r} S_j² / Σ S_j² from the cumulative energies."""
    total = S2_cum[-1]
    return float((total - (S2_cum[r - 1] if r > 0 else 0.0)) / max(total, 1e-300))


@dataclass
class MCKPResult:
    choice: list[int]  # chosen option index per group
    status: str
    gap: float
    seconds: float
    objective: float


def solve_mckp(costs: list[np.ndarray], errors: list[np.ndarray], budget: float, time_limit: float = 120.0,
               mip_rel_gap: float = 1e-6) -> MCKPResult:
    """min Σ_{l,j} e_lj x_lj  s.t.  Σ_j x_lj = 1 ∀l,  Σ c_lj x_lj ≤ budget,  x binary (HiGHS branch and cut)."""
    sizes = [len(c) for c in costs]
    n = sum(sizes)
    c = np.concatenate(errors).astype(np.float64)
    scale = max(float(np.abs(c).max()), 1e-300)  # objective in O(1) units for the solver's tolerances
    group = np.repeat(np.arange(len(sizes)), sizes)
    one_hot = sp.csr_matrix((np.ones(n), (group, np.arange(n))), shape=(len(sizes), n))
    budget_row = sp.csr_matrix(np.concatenate(costs).astype(np.float64)[None, :])
    t0 = time.perf_counter()
    res = milp(c / scale, integrality=np.ones(n), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_hot, 1, 1), LinearConstraint(budget_row, -np.inf, budget)],
               options={"time_limit": time_limit, "mip_rel_gap": mip_rel_gap, "disp": False})
    seconds = time.perf_counter() - t0
    if res.x is None:
        raise SvdpressError(f"lems: the ILP has no solution ({res.message.strip()}); is the ratio reachable "
                            "with the smallest allowed ranks (option min_fraction)?")
    bounds = np.cumsum([0] + sizes)
    choice = [int(np.argmax(res.x[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
    gap = float(res.mip_gap) if getattr(res, "mip_gap", None) is not None else float("nan")
    status = {0: "optimal", 1: "limit reached (best feasible)", 3: "unbounded"}.get(res.status, res.message)
    obj = float(sum(errors[l][j] for l, j in enumerate(choice)))
    return MCKPResult(choice, status, gap, seconds, obj)


def _step(p: AllocationProblem, cfg: LemsConfig) -> int:
    if cfg.rank_multiple is not None:
        return max(1, int(cfg.rank_multiple))
    return p.rank_multiple if p.rank_multiple > 1 else DEFAULT_STEP


def surrogate(p: AllocationProblem, cfg: LemsConfig, G: dict[str, float], step: int, min_fraction: float):
    """Per layer: the choices (None = dense, then ranks), their parameter counts and surrogate errors e_l(r)."""
    blocks, nblocks = block_index(p)
    counting = p.counting
    options, costs, errors = [], [], []
    for name, shape in p.shapes.items():
        S2 = np.cumsum(p.spectra[name].S.double().numpy() ** 2)
        r_p = rank_at(shape, cfg.probe_fraction, 1, counting)  # the rank the sensitivity probe truncated to
        scale = depth_bias(blocks[name], nblocks, cfg) * G[name] / max(tail_fraction(S2, r_p), 1e-12)
        ranks: list[Optional[int]] = [None, *candidate_ranks(shape, step, min_fraction, counting)]
        options.append(ranks)
        costs.append(np.array([counting.layer(shape, r) for r in ranks], dtype=np.float64))
        errors.append(np.array([0.0 if r is None else scale * tail_fraction(S2, r) for r in ranks]))
    return options, costs, errors


def _solve(p: AllocationProblem, cfg: LemsConfig, G, step, min_fraction):
    options, costs, errors = surrogate(p, cfg, G, step, min_fraction)
    res = solve_mckp(costs, errors, p.target, cfg.time_limit, cfg.mip_rel_gap)
    ranks = {name: options[i][j] for i, (name, j) in enumerate(zip(p.shapes, res.choice))}
    return ranks, res, sum(len(o) for o in options)


def _tune(p: AllocationProblem, cfg: LemsConfig, G, step, min_fraction) -> tuple[LemsConfig, dict]:
    """(α, γ) from a small grid by the KL of the whole truncated model (the repository tunes them with Optuna)."""
    probe = get_probe(p, probe_config(cfg))
    grid = [(float(a), float(g)) for a, g in itertools.product(cfg.tune_alphas, cfg.tune_gammas)]

    def trial(ag: tuple[float, float]) -> float:
        ranks, _, _ = _solve(p, replace(cfg, alpha=ag[0], gamma=ag[1]), G, step, min_fraction)
        return probe.loss(ranks)["kl"]

    trials = dict(zip(grid, dist.map_items(grid, trial, what="lems tuning")))  # grid points across ranks
    a, g = min(trials, key=trials.get)
    return replace(cfg, alpha=a, gamma=g), {f"alpha={k[0]},gamma={k[1]}": v for k, v in trials.items()}


@allocator("lems", options=LemsConfig)
def lems(p: AllocationProblem) -> Allocation:
    cfg = fill_config(LemsConfig, p.options, "lems")
    if p.ratio >= 1:
        return Allocation({name: None for name in p.shapes})
    step = _step(p, cfg)
    min_fraction = cfg.min_fraction if cfg.min_fraction is not None else (0.3 if p.ratio >= 0.5 else 0.1)
    if cfg.global_importance:
        sens = layer_sensitivity(p, (cfg.probe_fraction,), probe_config(cfg))
        G = {name: max(0.0, sens.loss[name][cfg.probe_fraction]["kl"]) for name in p.shapes}
        measure_s, probes = sens.seconds, sens.probes
    else:
        G, measure_s, probes = {name: 1.0 for name in p.shapes}, 0.0, 0
    t0 = time.perf_counter()
    trials = None
    if cfg.tune:
        cfg, trials = _tune(p, cfg, G, step, min_fraction)
    ranks, res, variables = _solve(p, cfg, G, step, min_fraction)
    rest_s = time.perf_counter() - t0
    info = {"solver": "HiGHS (scipy.optimize.milp)", "status": res.status, "mip_gap": res.gap,
            "solve_s": round(res.seconds, 3), "measure_s": round(measure_s, 2),
            "search_s": round(measure_s + rest_s, 2),  # measurements counted even when cached
            "probes": probes + (len(trials) if trials else 0), "surrogate": res.objective, "variables": variables,
            "rank_multiple": step, "min_fraction": min_fraction, "alpha": cfg.alpha, "gamma": cfg.gamma,
            "tuning": trials, "config": {k: v for k, v in vars(cfg).items()}}
    return Allocation(ranks, info)
