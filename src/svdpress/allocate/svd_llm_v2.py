"""SVD-LLM v2's loss-based allocation (Wang et al., NAACL 2025, Algorithm 1), no forwards needed.

Within each group of same-type layers (q_proj of every block, …) the theoretical truncation loss of the
uniform rank r_u (⌊c·r_be⌋, or under PivGa counting the rank keeping c of the weights) is L_l = ‖tail‖ = sqrt(Σ_{j≥r_u} S_j²) (whitened spectrum: the layer's output
error on calibration data). Compression is shared out inversely to log L:
    (1 − c_l) = N·(1 − c) · (1/log L_l) / Σ_k (1/log L_k)
so a group keeps the same total and lossier layers keep more. A group whose losses do not all exceed 1
(log ≤ 0) stays uniform. Ranks are rounded to the rank step, then fitted to the budget (to within one step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import SvdpressError
from . import Allocation, AllocationProblem, allocator
from .common import fill_config, fit_budget, rank_at, step_of


@dataclass
class SvdLlmV2Config:
    loss: str = "fro"  # fro: sqrt(Σ S_j²) (paper) | sum: Σ S_j (the LEMS repository's port)
    min_fraction: float = 0.05  # a layer keeps at least this fraction
    rank_multiple: int | None = None

    def check(self) -> None:
        if self.loss not in ("fro", "sum"):
            raise SvdpressError("svd-llm-v2: loss must be fro or sum")


def truncation_loss(S, r: int, kind: str) -> float:
    tail = S[r:].double()
    return float(tail.pow(2).sum().sqrt()) if kind == "fro" else float(tail.sum())


@allocator("svd-llm-v2", options=SvdLlmV2Config)
def svd_llm_v2(p: AllocationProblem) -> Allocation:
    cfg = fill_config(SvdLlmV2Config, p.options, "svd-llm-v2")
    step = step_of(p, cfg.rank_multiple)
    if p.ratio >= 1:
        return Allocation({name: None for name in p.shapes})
    loss = {n: truncation_loss(p.spectra[n].S, rank_at(s, p.ratio, 1, p.counting), cfg.loss)
            for n, s in p.shapes.items()}
    groups: dict[str, list[str]] = {}
    kinds = _kinds(p)
    for n in p.shapes:
        groups.setdefault(kinds[n], []).append(n)
    keep, uniform_groups = {}, []
    for kind, names in groups.items():
        if any(loss[n] <= 1 for n in names):
            keep.update({n: p.ratio for n in names})
            uniform_groups.append(kind)
            continue
        score = {n: 1 / math.log(loss[n]) for n in names}
        total = sum(score.values())
        keep.update({n: max(cfg.min_fraction, 1 - len(names) * (1 - p.ratio) * score[n] / total) for n in names})
    ranks = {n: rank_at(s, keep[n], step, p.counting) for n, s in p.shapes.items()}
    ranks = fit_budget(p, ranks, step, priority=loss.get)
    return Allocation(ranks, {"loss": cfg.loss, "uniform_groups": uniform_groups, "rank_multiple": step,
                              "search_s": 0.0})


def _kinds(p: AllocationProblem) -> dict[str, str]:
    """Layer type of each layer (q_proj, …) from the architecture map; without a runner (spectra alone), the last
    component of its name."""
    if p.runner is not None:
        kind = {t.name: t.kind for t in p.runner.arch.targets}
        if all(n in kind for n in p.shapes):
            return {n: kind[n] for n in p.shapes}
    return {n: n.rsplit(".", 1)[-1] for n in p.shapes}
