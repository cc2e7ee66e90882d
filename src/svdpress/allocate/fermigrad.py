"""FermiGrad (Rausch et al. 2025, arXiv 2512.03062): layer ranks by gradient descent on soft truncation.

Every target layer keeps its whole spectrum and gets a Fermi mask between its factors,

    y = U · ((S ⊙ F(μ_l)) ⊙ (V x)) + b,    F_j = 1 / (1 + exp((j + ½ − μ_l) / (N_l·T)))

with j = 0…N_l−1 the singular-value index, N_l the full rank and T the temperature. This is A·diag(F)·B with
A = U√S, B = √S V, computed from the spectrum's own U, S, V (no copy of the factors, no m×n product). The
½ shift centres the step between index μ−1 and μ, so Σ_j F_j ≈ μ_l and the hard cut r_l = round(μ_l) keeps
exactly the directions the soft mask mostly keeps. Only the chemical potentials μ_l are trained, on

    loss = KL(teacher ‖ student) + ρ · ((N_params(μ) − N_target) / N_target)²,    ρ ← ρ·growth every step

where the teacher is the dense model (its top-k log-probabilities are cached once), and the penalty is
normalized by N_target² so that ρ is dimensionless: ρ·x² with x the relative overshoot of the budget.

Smooth parameter count: N_params(μ) = Σ_l (m_l + n_l)·Σ_j F_j(μ_l) (+ biases), the factored count r·(m+n) of
`svdpress.params` with r replaced by the soft rank. It is *not* capped at the dense count m·n past the break-even
rank: a cap has zero gradient there, so a layer starting at full rank would never feel the budget. Past break-even
the smooth count therefore over-prices a layer; the hard cut then stores such a layer dense (cheaper than its
factors) and the budget it frees is refilled greedily. As T → 0 the smooth count equals the hard count for every
rank below break-even (tests check both).

Under PivGa counting (`AllocationProblem.pivga`) the same formula of `svdpress.params` gives
N_params(μ) = Σ_l (Σ_j F_j)·(m_l + n_l) − (Σ_j F_j)²: the identity block of the gauge-fixed factors is free, the
break-even rank is min(m, n), where this count meets m·n exactly, so nothing is over-priced. Its slope in the
soft rank, (m+n) − 2·Σ_j F_j, is |m − n| at full rank (0 for a square layer), so the default start at the
uniform allocation's ranks (`init="uniform"`) is the one that feels the budget from the first step.

The model runs through its runner (`svdpress.model`), so FermiGrad works whatever the placement: the windows are
embedded once, the teacher's top-k is cached from one pass through the dense blocks, and every step back-propagates
the KL block by block (`Runner.backward`) with the target layers replaced by FermiLinear masks sharing θ while their
block runs (`overrides`). The dense modules are never swapped out of the model. The KL is computed from two small
things per token, lse_t = log Σ_v exp(s_tv) and the student's logits at the teacher's top-k indices, gathered over
vocabulary chunks (`model.head.gather_lse`): the logits of all tokens are never held at once.

After training, ranks are cut at round(μ_l), and a greedy trim/fill meets the budget exactly, never above it. Its
damage estimate for one rank of layer l is g_l·S_j²/S_{r_l}², the measured ∂KL/∂μ_l at the final μ scaled by the
spectrum's own decay.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as Fn
from tqdm.auto import tqdm

from .. import distributed as dist
from ..errors import SvdpressError
from ..factorize import LayerSpectrum
from ..model.head import Head, gather_lse, topk_logprobs
from ..params import CLASSICAL, Counting, LayerShape, dense_count
from . import Allocation, AllocationProblem, allocator
from .common import fill_config

if TYPE_CHECKING:
    from ..model import Runner, State


@dataclass
class FermiGradConfig:
    """FermiGrad's settings; `--opt key=value` overrides any of them.

    Defaults follow the paper where they transfer to a 135M model on 2 CPU cores (T = 0.01, ρ growing
    geometrically, μ in a box [r_min, N]); the sample budget (16 windows of 128 tokens, 4 per step, 80 steps)
    is sized for 2 CPU cores: one step on SmolLM2-135M costs ~5 s there, so `svdpress compress --allocate
    fermigrad` on the default model takes ~7 min of FermiGrad on top of ~3 min of calibration. On a GPU, raise
    `steps`, `samples` and `batch_size` (the paper uses 1024 samples).
    """

    temperature: float = 0.01  # T: the mask's width is N_l·T singular values
    steps: int = 80
    lr: float = 0.02  # RMS step of θ (θ_l = parameters of layer l / mean budget per layer), see `_descend`
    lr_final: float = 0.1  # the step decays (cosine) to lr·lr_final
    momentum: float = 0.9
    rho_start: float = 10.0
    rho_growth: float = 1.05  # ρ_t = rho_start · rho_growth^t
    samples: int = 16  # windows of calibration text used by FermiGrad (cropped from the calibration samples)
    seqlen: int = 128  # tokens per window
    batch_size: int = 4  # windows per step
    r_min: int = 8  # box: r_min ≤ μ_l
    top_k: int = 64  # teacher log-probs cached per token (the rest of the vocabulary is one bucket)
    init: str = "uniform"  # "uniform": μ at the uniform allocation's ranks; "full": μ = N_l (the paper)
    cutoff: float = 10.0  # singular directions with F_j < e^-cutoff are skipped in the forward pass
    report_uniform_kl: bool = True  # also measure the uniform allocation's KL on the same tokens (diagnostic)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "FermiGradConfig":
        return fill_config(cls, options, "fermigrad")

    def validate(self) -> "FermiGradConfig":
        positive = ("temperature", "steps", "lr", "rho_start", "samples", "seqlen", "batch_size", "r_min", "top_k",
                    "cutoff")
        bad = [k for k in positive if getattr(self, k) <= 0]
        if bad:
            raise SvdpressError(f"fermigrad options must be positive: {', '.join(bad)}")
        if self.rho_growth < 1 or not (0 < self.lr_final <= 1) or not (0 <= self.momentum < 1):
            raise SvdpressError("fermigrad needs rho_growth ≥ 1, 0 < lr_final ≤ 1 and 0 ≤ momentum < 1")
        if self.init not in ("uniform", "full"):
            raise SvdpressError(f"fermigrad init must be 'uniform' or 'full', got {self.init!r}")
        return self



# ---------------------------------------------------------------------------------------------------------------
# The mask, the smooth count


def fermi(mu: torch.Tensor, n: int, full_rank: int, temperature: float, start: int = 0) -> torch.Tensor:
    """F_j = 1/(1 + exp((j + ½ − μ)/(N·T))) for j = start…n−1 (differentiable in μ)."""
    j = torch.arange(start, n, device=mu.device, dtype=mu.dtype)
    return torch.sigmoid((mu - j - 0.5) / (full_rank * temperature))


def smooth_rank(mu: torch.Tensor, full_rank: int, temperature: float) -> torch.Tensor:
    """Σ_j F_j(μ): the soft rank, ≈ μ inside (½, N − ½), exactly round(μ) as T → 0."""
    return fermi(mu, full_rank, full_rank, temperature).sum()


def smooth_params(mu: torch.Tensor, shape: LayerShape, temperature: float,
                  counting: Counting = CLASSICAL) -> torch.Tensor:
    """The factored count of `svdpress.params` at the soft rank ρ = Σ_j F_j(μ), plus the bias: (m + n)·ρ, or
    (m + n)·ρ − ρ² under PivGa counting; not capped at break-even."""
    rho = smooth_rank(mu, shape.full_rank, temperature)
    return counting.factored(shape, rho) + (shape.m if shape.bias else 0)


def mu_max(full_rank: int, temperature: float, cutoff: float) -> float:
    """Top of the box: every direction open to within e^-cutoff (F_{N−1} ≥ σ(cutoff)), i.e. the dense layer."""
    return full_rank + 0.5 + cutoff * full_rank * temperature


class MaskedSpectrum(nn.Module):
    """y = U·(g ⊙ (V x)) + b over a layer's full spectrum, with gains g = S ⊙ mask(θ[index]) from a subclass
    (FermiGrad's Fermi function, Dobi-SVD's tanh truncation). The spectrum's tensors are used in place, never
    copied (on the CPU); only the first k directions, those whose mask is at least e^-cutoff, are computed, so a
    step costs about what the truncated layer costs rather than the full-rank factors. `hard_rank` switches to
    the hard cut at that rank (for measuring the loss of a discrete allocation)."""

    def __init__(self, spec: LayerSpectrum, bias: Optional[torch.Tensor], theta: nn.Parameter, index: int,
                 cutoff: float, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.U = spec.U.to(device=device, dtype=torch.float32)
        self.V = spec.V.to(device=device, dtype=torch.float32)
        self.S = spec.S.to(device=device, dtype=torch.float32)
        self.bias = None if bias is None else bias.detach().to(device=device, dtype=torch.float32)
        self.N = spec.full_rank
        self.__dict__["theta"] = theta  # shared by every masked layer; kept out of the model's parameters
        self.index, self.cutoff = index, cutoff
        self.hard_rank: Optional[int] = None

    def soft_gains(self) -> tuple[int, torch.Tensor]:
        """(k, S[:k] ⊙ mask[:k]): the directions still (partly) open and their gains, differentiable in θ."""
        raise NotImplementedError

    def gains(self) -> tuple[int, torch.Tensor]:
        if self.hard_rank is not None:
            k = min(self.hard_rank, self.N)
            return k, self.S[:k]
        return self.soft_gains()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, g = self.gains()
        h = Fn.linear(x.float(), self.V[:k]) * g  # (S ⊙ mask) ⊙ (V x)
        return Fn.linear(h, self.U[:, :k], self.bias).to(x.dtype)


class FermiLinear(MaskedSpectrum):
    """FermiGrad's masked layer: gains S ⊙ F(μ), μ = θ[index]·scale."""

    def __init__(self, spec: LayerSpectrum, bias: Optional[torch.Tensor], theta: nn.Parameter, index: int,
                 temperature: float, cutoff: float, scale: float, device: str | torch.device = "cpu") -> None:
        super().__init__(spec, bias, theta, index, cutoff, device)
        self.temperature, self.scale = temperature, scale

    @property
    def mu(self) -> torch.Tensor:
        return self.theta[self.index] * self.scale

    def active(self, mu: float) -> int:
        """Columns with F_j ≥ e^-cutoff: j + ½ − μ < cutoff·N·T."""
        return max(1, min(self.N, math.ceil(mu - 0.5 + self.cutoff * self.N * self.temperature)))

    def soft_gains(self) -> tuple[int, torch.Tensor]:
        mu = self.mu
        k = self.active(float(mu.detach()))
        return k, self.S[:k] * fermi(mu, k, self.N, self.temperature)


# ---------------------------------------------------------------------------------------------------------------
# Teacher cache and the KL


@torch.no_grad()
def teacher_topk(runner: "Runner", states: list[State], k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The dense model's top-k next-token log-probs for every token of each batch of states: (indices int64,
    log-probs float32), each (T, k) with T the batch's tokens, parked by the runner. One pass through the dense
    blocks, the final norm, and the head over vocabulary chunks; cached once, so no second model is held while
    the student trains."""
    head = runner.head
    out = []
    for h in runner.forward(states):
        h = runner.final(h)
        idx, logp = topk_logprobs(head, h.reshape(-1, h.shape[-1]), k)
        out.append((runner.park(idx), runner.park(logp)))
    return out


def topk_kl(head: Head, h: torch.Tensor, t_idx: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p ‖ q) between teacher p and student q coarse-grained to the teacher's top-k
    tokens plus one bucket for the rest of the vocabulary: Σ_top p (log p − log q) + p_rest log(p_rest/q_rest).
    A lower bound of the full KL (coarse-graining never increases it), exact for the tokens that matter.

    h (T, d): the student's hidden states after the final norm; t_idx, t_logp (T, k): the teacher's top-k.
    log q_t,i = s_t,i − lse_t from `gather_lse` (the vocabulary in chunks); differentiable in h."""
    lse, s = gather_lse(head, h, t_idx)
    q_top = s - lse[:, None]
    p_top = t_logp.exp()
    p_rest = (1 - p_top.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - q_top.exp().sum(-1)).clamp_min(1e-12)
    kl = (p_top * (t_logp - q_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.mean()


def fermi_windows(samples: torch.Tensor, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """`n` windows of `seqlen` tokens cut from the calibration samples (seeded choice among all windows)."""
    L = min(seqlen, samples.shape[1])
    per = samples.shape[1] // L
    windows = samples[:, :per * L].reshape(-1, L)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(windows), generator=g)[:n]
    return windows[pick]


# ---------------------------------------------------------------------------------------------------------------
# Training


class SpectrumMasks:
    """One parameter vector θ shared by a masked layer per target layer, given to the runner as `overrides`:
    while a block runs, its target layers are masks (`make_layer`, from a subclass); the dense modules stay in the
    model, untouched. On a resident model (offload "none") each mask is built once and reused; when streaming,
    a mask is built from the spectrum on the execution device each time its block is materialized, so the
    device holds one block's spectra at a time."""

    def __init__(self, problem: AllocationProblem, theta0: torch.Tensor) -> None:
        self.runner = problem.runner
        self.names = list(problem.shapes)
        self.theta = nn.Parameter(theta0.clone().to(self.runner.device))
        self.spectra = problem.spectra
        self.resident = self.runner.offload == "none"
        self.layers: dict[str, MaskedSpectrum] = {}  # the reused masks (resident model only)
        self.hard: Optional[Mapping[str, Optional[int]]] = None

    def make_layer(self, name: str, index: int, original: nn.Module) -> MaskedSpectrum:
        raise NotImplementedError

    def _make(self, name: str, index: int, original: nn.Module) -> MaskedSpectrum:
        layer = self.layers.get(name)
        if layer is None:
            layer = self.make_layer(name, index, original)
            if self.resident:
                self.layers[name] = layer
        layer.hard_rank = None if self.hard is None else (self.hard.get(name) or layer.N)
        return layer

    def overrides(self) -> dict[str, Callable[[nn.Module], nn.Module]]:
        """Target layer name → factory of its mask (for `Runner.forward` / `Runner.backward`)."""
        return {name: partial(self._make, name, i) for i, name in enumerate(self.names)}

    def set_hard(self, ranks: Optional[Mapping[str, Optional[int]]]) -> None:
        """Hard cut at `ranks` (None rank = dense = full rank), or back to the soft masks with `ranks=None`."""
        self.hard = None if ranks is None else dict(ranks)


class FermiMasks(SpectrumMasks):
    """FermiLinear masks, μ_l = θ_l·scale_l (`rank_scales`)."""

    def __init__(self, problem: AllocationProblem, cfg: FermiGradConfig, theta0: torch.Tensor) -> None:
        super().__init__(problem, theta0)
        self.scales = rank_scales(problem)
        self.cfg = cfg

    def make_layer(self, name: str, index: int, original: nn.Module) -> FermiLinear:
        return FermiLinear(self.spectra[name], original.bias, self.theta, index, self.cfg.temperature,
                           self.cfg.cutoff, float(self.scales[index]), self.runner.device)


def rank_scales(problem: AllocationProblem) -> torch.Tensor:
    """μ_l = θ_l·scale_l with scale_l = (N_target / L)/(m_l + n_l): θ_l is layer l's factored parameter count in
    units of the mean budget per layer. In θ every layer's parameters cost the same, so the penalty pushes all
    layers equally and only the KL tells them apart: the KKT point (equal marginal KL per parameter) is where the
    descent stops, and the path to it is not biased by layer sizes."""
    unit = problem.target / len(problem.shapes)
    return torch.tensor([unit / (s.m + s.n) for s in problem.shapes.values()], dtype=torch.float64)


def initial_theta(problem: AllocationProblem, cfg: FermiGradConfig) -> torch.Tensor:
    """θ at the start: the uniform allocation's ranks, or full rank (the paper's start)."""
    from .uniform import uniform

    ranks = uniform(problem).ranks if cfg.init == "uniform" else {}
    mu = torch.tensor([float(ranks.get(n) or s.full_rank) for n, s in problem.shapes.items()], dtype=torch.float64)
    return (mu / rank_scales(problem)).float()


def box(problem: AllocationProblem, cfg: FermiGradConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of θ from r_min ≤ μ_l ≤ μ_max(N_l) (the top of the box leaves the layer fully open)."""
    shapes, scales = list(problem.shapes.values()), rank_scales(problem)
    lo = torch.tensor([min(cfg.r_min, s.full_rank) for s in shapes], dtype=torch.float64) / scales
    hi = torch.tensor([mu_max(s.full_rank, cfg.temperature, cfg.cutoff) for s in shapes], dtype=torch.float64) / scales
    return lo.float().to(device), hi.float().to(device)


def total_smooth_params(theta: torch.Tensor, scales: torch.Tensor, shapes: list[LayerShape],
                        temperature: float, counting: Counting = CLASSICAL) -> torch.Tensor:
    return sum(smooth_params(theta[i] * float(scales[i]), s, temperature, counting) for i, s in enumerate(shapes))


@torch.no_grad()
def mean_kl(runner: "Runner", states: list[State], teacher: list[tuple[torch.Tensor, torch.Tensor]],
            overrides: Optional[Mapping[str, Callable[[nn.Module], nn.Module]]] = None) -> float:
    """`topk_kl` averaged over every window of `states` (all windows have the same length, so this is the mean
    over tokens), the target layers replaced by `overrides` while their block runs."""
    head = runner.head
    total, n = 0.0, 0
    for h, (t_idx, t_logp) in zip(runner.forward(states, overrides=overrides), teacher):
        z = runner.final(h)
        kl = topk_kl(head, z.reshape(-1, z.shape[-1]), t_idx.to(z.device), t_logp.to(z.device))
        total += float(kl) * z.shape[0]
        n += z.shape[0]
    total, n = dist.sum_floats([total, n], "fermigrad KL")  # each rank held its part of every batch
    return total / n


def train(problem: AllocationProblem, cfg: FermiGradConfig) -> dict[str, Any]:
    """Train the chemical potentials; returns μ per layer, ∂KL/∂μ per layer (averaged over the last quarter of
    the steps) and the record of the run. The windows are cut into fixed batches of `batch_size` and embedded
    once (block-0 states do not depend on μ); the model's modules are never replaced."""
    runner = problem.runner
    if runner is None or problem.samples is None:
        raise SvdpressError("fermigrad needs the model's runner and calibration samples (run it through compress())")
    windows = fermi_windows(problem.samples, cfg.samples, cfg.seqlen, problem.seed)
    t0 = time.perf_counter()
    batches = list(windows.split(cfg.batch_size))
    # DDP: under torchrun every rank takes its rows of every batch, weighs its mean KL by its share of the batch
    # and the ∂KL/∂θ are all-reduced, so each step sees the gradient of the whole batch (one process's)
    parts = [dist.shard(b, "fermigrad windows of a batch (batch_size)") for b in batches]
    shares = [len(p) / len(b) for p, b in zip(parts, batches)]
    states = runner.embed(parts)
    teacher = teacher_topk(runner, states, cfg.top_k)
    masks = FermiMasks(problem, cfg, initial_theta(problem, cfg))
    run = _descend(masks, problem, cfg, states, teacher, shares)
    run.update(windows=windows, states=states, teacher=teacher, masks=masks, train_s=time.perf_counter() - t0)
    return run


def _descend(masks: FermiMasks, problem: AllocationProblem, cfg: FermiGradConfig, states: list[State],
             teacher: list[tuple[torch.Tensor, torch.Tensor]], shares: Optional[list[float]] = None
             ) -> dict[str, Any]:
    """Normalized momentum descent on θ: v ← β·v + g, θ ← θ − η_t·v/rms(v), clipped to the box.

    Not Adam: Adam divides every coordinate by its own gradient scale, so while the budget penalty dominates all
    layers move at the same speed whatever their KL gradient (observed: every μ fell in lockstep to the same
    fraction of its full rank). One global normalization keeps the relative sizes of the gradients, which is the
    information FermiGrad exists to use; η_t (cosine from lr to lr·lr_final) is the RMS step of θ.

    Step t takes one batch (every batch once per epoch, in a seeded order); ∂KL/∂θ is θ.grad after
    `Runner.backward`, which back-propagates through every block with the masks in place. `shares[b]`: this
    rank's fraction of batch b's windows under torchrun (its KL is weighted by it, the gradients and KLs summed
    over ranks); None or all 1 in one process."""
    runner, device, theta, target = problem.runner, problem.device, masks.theta, problem.target
    names, shapes, scales = masks.names, list(problem.shapes.values()), masks.scales
    head = runner.head
    lo, hi = box(problem, cfg, device)
    g = torch.Generator().manual_seed(problem.seed)
    order = torch.cat([torch.randperm(len(states), generator=g)
                       for _ in range(math.ceil(cfg.steps / len(states)) + 1)]).tolist()
    rho, history = cfg.rho_start, []
    velocity = torch.zeros_like(theta)
    grad_sum, grad_n, tail = torch.zeros_like(theta), 0, max(1, cfg.steps // 4)
    bar = tqdm(range(cfg.steps), desc="fermigrad", disable=not problem.progress)
    for step in bar:
        t_idx, t_logp = (t.to(device) for t in teacher[order[step]])

        share = 1.0 if shares is None else shares[order[step]]

        def loss_fn(_j: int, h: torch.Tensor) -> torch.Tensor:
            z = runner.final(h)
            kl = topk_kl(head, z.reshape(-1, z.shape[-1]), t_idx, t_logp)
            return kl if share == 1.0 else kl * share

        theta.grad = None
        kl = runner.backward([states[order[step]]], loss_fn, overrides=masks.overrides())
        g_kl = theta.grad.detach().clone() if theta.grad is not None else torch.zeros_like(theta)
        theta.grad = None
        if dist.active():  # DDP: the batch's gradient and KL are the sums of the ranks' weighted parts
            dist.all_reduce_sum([g_kl], "fermigrad gradient")
            kl = dist.sum_floats([kl], "fermigrad KL")[0]
        count = total_smooth_params(theta, scales, shapes, cfg.temperature, problem.counting)
        x = (count - target) / target
        penalty = rho * x ** 2  # ρ·((N(μ) − N_t)/N_t)²
        (g_pen,) = torch.autograd.grad(penalty, theta)
        with torch.no_grad():
            velocity.mul_(cfg.momentum).add_(g_kl + g_pen)
            eta = cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
            theta.sub_(eta * velocity / velocity.pow(2).mean().sqrt().clamp_min(1e-30))
            theta.copy_(torch.maximum(torch.minimum(theta, hi), lo))
        if step >= cfg.steps - tail:
            grad_sum += g_kl
            grad_n += 1
        ratio = float(count.detach()) / problem.dense
        loss = kl + float(penalty.detach())
        bar.set_postfix(loss=f"{loss:.4f}", kl=f"{kl:.4f}", ratio=f"{ratio:.4f}", rho=f"{rho:.3g}")
        history.append({"step": step, "loss": loss, "kl": kl, "ratio": ratio, "rho": rho})
        rho *= cfg.rho_growth
    mu = (theta.detach().cpu().double() * scales).tolist()
    dkl_dmu = (grad_sum.cpu().double() / max(grad_n, 1) / scales).tolist()  # ∂KL/∂μ = ∂KL/∂θ / scale
    tail_kl = [h["kl"] for h in history[-tail:]]
    return {"mu": dict(zip(names, mu)), "dkl_dmu": dict(zip(names, dkl_dmu)), "history": history,
            "final_kl": sum(tail_kl) / len(tail_kl), "rho_final": history[-1]["rho"]}

# ---------------------------------------------------------------------------------------------------------------
# Hard cut and exact budget


class RankLadder:
    """The ranks one layer may take, r_min, r_min+step, …, below break-even (under `counting`), then dense (stored
    as N). Value V(r) = −w·Σ_{j≥r} S_j²: the estimated KL cost of truncating at r (0 when dense)."""

    def __init__(self, shape: LayerShape, spec: LayerSpectrum, weight: float, r_min: int, step: int,
                 counting: Counting = CLASSICAL) -> None:
        self.shape, self.step, self.counting = shape, step, counting
        self.break_even = counting.break_even(shape)
        self.top = shape.full_rank
        self.low = min(max(step, -(-r_min // step) * step), self.last_factored())
        energy = spec.S.double() ** 2
        tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # tail[r] = Σ_{j≥r} S_j²
        self.tail = torch.cat([tail, torch.zeros(1, dtype=tail.dtype)]).tolist()
        self.w = weight

    def last_factored(self) -> int:
        """Largest rank (multiple of step) below break-even."""
        return max(self.step, (self.break_even - 1) // self.step * self.step)

    def snap(self, mu: float) -> int:
        r = int(round(mu / self.step)) * self.step
        return self.top if r >= self.break_even else max(self.low, min(r, self.last_factored()))

    def down(self, r: int) -> Optional[int]:
        nxt = self.last_factored() if r == self.top else r - self.step
        return nxt if nxt >= self.low and nxt < r else None

    def up(self, r: int) -> Optional[int]:
        if r == self.top:
            return None
        nxt = r + self.step
        return self.top if nxt >= self.break_even else nxt

    def cost(self, r: int) -> int:
        return self.counting.layer(self.shape, r)

    def value(self, r: int) -> float:
        return 0.0 if r == self.top else -self.w * self.tail[min(r, len(self.tail) - 1)]


def hard_ranks(problem: AllocationProblem, mu: Mapping[str, float], dkl_dmu: Mapping[str, float],
               r_min: int) -> tuple[dict[str, int], dict[str, int]]:
    """r_l = round(μ_l), then greedy trim (least damage per parameter saved) until the budget holds and greedy
    fill (most gain per parameter) while something still fits. Returns the ranks (N = dense) and move counts."""
    step = max(1, problem.rank_multiple)
    ladders = {}
    for name, shape in problem.shapes.items():
        spec = problem.spectra[name]
        S = spec.S.double()
        r0 = min(max(1, int(round(mu[name]))), shape.full_rank)
        ref = float(S[min(r0, len(S) - 1)] ** 2) or 1e-30
        w = max(-dkl_dmu[name], 1e-12) / ref  # KL per unit of S² at the cut: −∂KL/∂μ / S_r²
        ladders[name] = RankLadder(shape, spec, w, r_min, step, problem.counting)
    ranks = {n: lad.snap(mu[n]) for n, lad in ladders.items()}
    total = sum(lad.cost(ranks[n]) for n, lad in ladders.items())
    moves = {"trimmed": 0, "filled": 0}

    def ratio_down(n: str) -> Optional[tuple[float, int]]:
        lad, r = ladders[n], ranks[n]
        d = lad.down(r)
        if d is None:
            return None
        saved = lad.cost(r) - lad.cost(d)
        return ((lad.value(r) - lad.value(d)) / saved, d) if saved > 0 else None

    heap = [(k[0], n, ranks[n]) for n in ranks if (k := ratio_down(n))]
    heapq.heapify(heap)
    while total > problem.target:
        if not heap:
            raise SvdpressError(f"ratio {problem.ratio} cannot be met with r_min={r_min}: lower r_min")
        _, n, r = heapq.heappop(heap)
        if ranks[n] != r:
            continue
        d = ladders[n].down(r)
        total -= ladders[n].cost(r) - ladders[n].cost(d)
        ranks[n] = d
        moves["trimmed"] += 1
        if (k := ratio_down(n)):
            heapq.heappush(heap, (k[0], n, d))

    def ratio_up(n: str) -> Optional[float]:
        lad, r = ladders[n], ranks[n]
        nxt = lad.up(r)
        if nxt is None:
            return None
        extra = lad.cost(nxt) - lad.cost(r)
        return (lad.value(nxt) - lad.value(r)) / max(extra, 1)

    heap = [(-k, n, ranks[n]) for n in ranks if (k := ratio_up(n)) is not None]
    heapq.heapify(heap)
    while heap:
        _, n, r = heapq.heappop(heap)
        if ranks[n] != r:
            continue
        lad = ladders[n]
        nxt = lad.up(r)
        extra = lad.cost(nxt) - lad.cost(r)
        if total + extra > problem.target:
            continue  # never fits again: the slack only shrinks
        total += extra
        ranks[n] = nxt
        moves["filled"] += 1
        if (k := ratio_up(n)) is not None:
            heapq.heappush(heap, (-k, n, nxt))
    return ranks, moves


# ---------------------------------------------------------------------------------------------------------------


@allocator("fermigrad", options=FermiGradConfig)
def fermigrad(problem: AllocationProblem) -> Allocation:
    cfg = FermiGradConfig.from_options(problem.options)
    if problem.ratio >= 1:
        return Allocation({name: None for name in problem.shapes}, {"note": "ratio 1: everything dense"})
    torch.manual_seed(problem.seed)
    t0 = time.perf_counter()
    run = train(problem, cfg)
    ranks, moves = hard_ranks(problem, run["mu"], run["dkl_dmu"], cfg.r_min)
    counting = problem.counting
    rounded = {n: _round_rank(run["mu"][n], s, counting) for n, s in problem.shapes.items()}
    final = {n: (None if r >= problem.shapes[n].full_rank else r) for n, r in ranks.items()}
    info: dict[str, Any] = {
        "config": asdict(cfg),
        "steps": cfg.steps,
        "tokens_per_step": cfg.batch_size * run["windows"].shape[1],
        "train_time_s": round(run["train_s"], 2),
        "final_kl": run["final_kl"],
        "rho": {"start": cfg.rho_start, "growth": cfg.rho_growth, "final": run["rho_final"],
                "schedule": "rho_t = rho_start * rho_growth^t; penalty rho*((N(mu)-N_target)/N_target)^2"},
        "smooth_ratio_final": run["history"][-1]["ratio"],
        "rounded_ratio": counting.total(problem.shapes, rounded) / dense_count(problem.shapes),
        "adjust_moves": moves,
        "mu": {n: round(v, 3) for n, v in run["mu"].items()},
        "history": run["history"][::max(1, cfg.steps // 50)],
    }
    info.update(_hard_kls(problem, cfg, run, final))
    info["time_s"] = round(time.perf_counter() - t0, 2)
    return Allocation(final, info)


def _round_rank(mu: float, shape: LayerShape, counting: Counting) -> Optional[int]:
    """round(μ) before the budget is adjusted (None = dense), for the record."""
    r = int(round(mu))
    return None if counting.is_dense(shape, r) else max(1, r)


def _hard_kls(problem: AllocationProblem, cfg: FermiGradConfig, run: dict, final: dict) -> dict[str, float]:
    """KL of the hard-cut allocation (and of uniform, same tokens) on the FermiGrad windows: the figure the
    training optimized, measured on the discrete model that will be built."""
    from .uniform import uniform

    masks: FermiMasks = run["masks"]
    out: dict[str, float] = {}
    todo = {"kl_fermigrad": final}
    if cfg.report_uniform_kl:
        todo["kl_uniform"] = uniform(problem).ranks
    try:
        for key, ranks in todo.items():
            masks.set_hard(ranks)
            out[key] = mean_kl(problem.runner, run["states"], run["teacher"], masks.overrides())
    finally:
        masks.set_hard(None)
    return out
