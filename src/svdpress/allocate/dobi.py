"""Dobi-SVD's truncation positions (Wang et al., ICLR 2025, arXiv 2502.02723, §3.2): differentiable truncation of
the activations' singular values, one trainable position k_l per layer, trained on the model's loss under a
parameter budget.

Every target layer's output y = W x is replaced, while the positions train, by its truncated activation

    y_k = Q·diag(T(k_l))·Qᵀ·(W x) + b,     T_i(k) = ½·tanh(β·(k − i − ½)) + ½,   i = 0…N_l−1,

with Q the principal directions of the layer's outputs on the calibration tokens (the `dobi-svd` spectrum:
U = Q, S = the activation singular values, S·V = Qᵀ W), so y_k = U·((S ⊙ T) ⊙ (V x)) + b. The tanh step is the
paper's (its BETA, default 10), shifted by ½ so that the hard cut it approaches is round(k) directions. The
positions are trained with Adam on the paper's objective

    loss = task + λ·|N_params(k)/N_dense − ratio|,    N_params(k) = Σ_l min(r(k_l), m_l·n_l)

where r(k) is the factored count of `svdpress.params` at the real rank k ((m+n)·k classically, PivGa's (m+n)·k − k²
with `--pivga`), capped at the dense count as in the reference code, and `task` is the paper's perplexity
exp(mean NLL) of the batch (`loss=ppl`, the default) or the top-k KL to the dense model (`loss=kl`, FermiGrad's
chunked KL). With `loss=ppl` the weight λ is relative to the perplexity's scale (the paper's models sit near 10);
where the perplexity is far larger its gradient outweighs the budget term and the soft ratio drifts from the
target while training (the final trim still meets the budget), which `loss=kl` does not suffer as much. The
learning rate follows a cosine schedule (the reference code's CosineAnnealingLR). Each k_l is
trained as θ_l = k_l/N_l, the kept rank ratio, clipped to [r_min/N_l, fully open] (the reference code adds a
quadratic penalty outside [0, seq_len] instead).

After training the ranks are round(k_l), and a greedy trim/fill (FermiGrad's `hard_ranks`: least estimated damage
per parameter first, the damage of a rank of layer l being −∂loss/∂k_l scaled by the activation energy it carries,
S_j²/S_{r_l}²) meets the budget: never above it, and below it by less than one rank step of one layer. The paper
instead takes ceil(γ) and accepts the ratio the training reached.

Differences from the paper (see also factorize/dobi_svd.py):
- The activations are truncated in one basis per layer, the principal directions of its outputs over the whole
  calibration set (the dense model's), not a fresh SVD of each sequence's activations at every step. The paper's
  per-sequence SVD needs a differentiable SVD with a Taylor-expanded backward for stability; in a fixed basis the
  truncation is linear in the mask, its gradient is exact and cheap, and the trained positions refer to the very
  directions the weight update (W_r = Q_r Q_rᵀ W) keeps. The price: the basis does not follow the changes that the
  upstream layers' truncations make to a layer's inputs while the positions train.
- The position is a rank of the layer's weight, k ∈ [0, N], not the paper's γ ∈ [0, seq_len] on one sequence's
  activation spectrum (mapped to a rank by min(m, n)/seq_len).
- Remapping (8-bit storage of part of the factors) is left out: it changes the bytes per parameter, which the one
  parameter count of svdpress does not express.
- torchrun: not supported yet (one process only).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import distributed as dist
from ..errors import SvdpressError
from ..factorize import LayerSpectrum
from ..model.head import nll_sum
from . import Allocation, AllocationProblem, allocator
from .common import fill_config
from .fermigrad import MaskedSpectrum, SpectrumMasks, fermi_windows, hard_ranks, teacher_topk, topk_kl


@dataclass
class DobiConfig:
    """Dobi-SVD's training settings; `--opt key=value` overrides any of them.

    The paper trains 20 epochs of 256 sequences of 2048 tokens (Adam, lr 5 → 4 on γ ∈ [0, 2048], BETA 10, λ 200);
    the defaults here are sized for 2 CPU cores (16 windows of 128 tokens, 4 per step, 60 steps), with lr in
    units of the kept rank ratio k/N. On a GPU raise `steps`, `samples`, `seqlen` and `batch_size`."""

    steps: int = 60
    lr: float = 0.01  # Adam step on θ = k/N
    lr_final: float = 0.1  # cosine decay to lr·lr_final
    beta: float = 10.0  # sharpness of the tanh truncation (the paper's BETA), per singular-value index
    lambda_reg: float = 200.0  # λ of the budget term λ·|ratio(k) − ratio|
    loss: str = "ppl"  # ppl: exp(mean NLL) (the paper) | kl: top-k KL to the dense model
    samples: int = 16  # training windows cut from the calibration samples
    seqlen: int = 128  # tokens per window
    batch_size: int = 4  # windows per step
    r_min: int = 1  # smallest rank a layer may train to / be cut at
    top_k: int = 64  # teacher log-probs cached per token (loss=kl)
    cutoff: float = 10.0  # directions whose mask is below e^-cutoff are skipped in the forward pass
    report_uniform: bool = True  # also measure the uniform allocation's loss on the same windows (diagnostic)

    def validate(self) -> "DobiConfig":
        positive = ("steps", "lr", "beta", "samples", "seqlen", "batch_size", "r_min", "top_k", "cutoff")
        bad = [k for k in positive if getattr(self, k) <= 0]
        if bad:
            raise SvdpressError(f"dobi options must be positive: {', '.join(bad)}")
        if self.lambda_reg < 0 or not (0 < self.lr_final <= 1):
            raise SvdpressError("dobi needs lambda_reg ≥ 0 and 0 < lr_final ≤ 1")
        if self.loss not in ("ppl", "kl"):
            raise SvdpressError(f"dobi loss must be 'ppl' or 'kl', got {self.loss!r}")
        return self


def truncation(k: torch.Tensor, n: int, beta: float) -> torch.Tensor:
    """T_i(k) = ½·tanh(β·(k − i − ½)) + ½ for i = 0…n−1 (differentiable in k)."""
    i = torch.arange(n, device=k.device, dtype=k.dtype)
    return 0.5 * torch.tanh(beta * (k - i - 0.5)) + 0.5


def open_position(full_rank: int, beta: float, cutoff: float) -> float:
    """The position at which every direction is kept to within e^-cutoff (the dense layer)."""
    return full_rank + 0.5 + cutoff / (2 * beta)


class DobiLinear(MaskedSpectrum):
    """y = U·((S ⊙ T(k)) ⊙ (V x)) + b with k = θ[index]·N: the layer's output truncated in its activations'
    principal basis (the MaskedSpectrum forward with Dobi-SVD's tanh truncation as the mask)."""

    def __init__(self, spec: LayerSpectrum, bias: Optional[torch.Tensor], theta: nn.Parameter, index: int,
                 beta: float, cutoff: float, device: str | torch.device = "cpu") -> None:
        super().__init__(spec, bias, theta, index, cutoff, device)
        self.beta = beta

    @property
    def k(self) -> torch.Tensor:
        return self.theta[self.index] * self.N

    def soft_gains(self) -> tuple[int, torch.Tensor]:
        k = self.k
        # T_i ≥ e^-cutoff ⇔ β(k − i − ½) ≳ −cutoff/2: the directions still (partly) open
        a = max(1, min(self.N, math.ceil(float(k.detach()) - 0.5 + self.cutoff / (2 * self.beta))))
        return a, self.S[:a] * truncation(k, a, self.beta)


class DobiMasks(SpectrumMasks):
    """DobiLinear masks, k_l = θ_l·N_l, in each target layer's place while its block runs (SpectrumMasks)."""

    def __init__(self, problem: AllocationProblem, cfg: DobiConfig, theta0: torch.Tensor) -> None:
        super().__init__(problem, theta0)
        self.cfg = cfg

    def make_layer(self, name: str, index: int, original: nn.Module) -> DobiLinear:
        return DobiLinear(self.spectra[name], original.bias, self.theta, index, self.cfg.beta, self.cfg.cutoff,
                          self.runner.device)


def full_ranks(problem: AllocationProblem) -> torch.Tensor:
    return torch.tensor([float(problem.spectra[n].full_rank) for n in problem.shapes], dtype=torch.float64)


def initial_theta(problem: AllocationProblem) -> torch.Tensor:
    """θ at the start: the uniform allocation's rank ratios (the reference code starts every γ at the target
    ratio's rank, target·m·n/(m+n))."""
    from .uniform import uniform

    ranks = uniform(problem).ranks
    k = torch.tensor([float(ranks.get(n) or s.full_rank) for n, s in problem.shapes.items()], dtype=torch.float64)
    return (k / full_ranks(problem)).float()


def smooth_size(theta: torch.Tensor, problem: AllocationProblem) -> torch.Tensor:
    """Σ_l min(r(k_l), m_l·n_l) + biases, r the factored count at the real rank k_l = θ_l·N_l (differentiable)."""
    counting, total = problem.counting, 0
    N = full_ranks(problem).to(theta.device, theta.dtype)
    for i, s in enumerate(problem.shapes.values()):
        r = counting.factored(s, theta[i] * N[i])
        total = total + torch.clamp(r, max=float(s.m * s.n)) + (s.m if s.bias else 0)
    return total


def task_loss(runner, h: torch.Tensor, ids: torch.Tensor, teacher=None) -> torch.Tensor:
    """The batch's perplexity exp(mean NLL) (the paper's loss), or with a teacher (its top-k indices and
    log-probs) the mean top-k KL to the dense model. h: the last block's output (B, L, d)."""
    z = runner.final(h)
    head = runner.head
    if teacher is not None:
        t_idx, t_logp = (t.to(z.device) for t in teacher)
        return topk_kl(head, z.reshape(-1, z.shape[-1]), t_idx, t_logp)
    ids = ids.to(z.device)
    zz = z[:, :-1]
    return (nll_sum(head, zz.reshape(-1, zz.shape[-1]), ids[:, 1:].reshape(-1)) / ids[:, 1:].numel()).exp()


@torch.no_grad()
def hard_loss(run: dict, ranks: Mapping[str, Optional[int]]) -> float:
    """The task loss of the hard cut at `ranks` (None = dense) on every training window: the mean of the
    batches' losses (all batches hold the same number of tokens but perhaps the last)."""
    masks: DobiMasks = run["masks"]
    runner = masks.runner
    teacher = run["teacher"]
    masks.set_hard(ranks)
    try:
        losses = [float(task_loss(runner, h, run["batches"][j], None if teacher is None else teacher[j]))
                  for j, h in enumerate(runner.forward(run["states"], overrides=masks.overrides()))]
    finally:
        masks.set_hard(None)
    return sum(losses) / len(losses)


def train(problem: AllocationProblem, cfg: DobiConfig) -> dict[str, Any]:
    """Train the positions; returns k per layer, ∂loss/∂k per layer (mean over the last quarter of the steps) and
    the record of the run."""
    runner = problem.runner
    if runner is None or problem.samples is None:
        raise SvdpressError("dobi needs the model's runner and calibration samples (run it through compress())")
    if dist.active():
        raise SvdpressError("--allocate dobi does not run under torchrun yet: run it in one process")
    t0 = time.perf_counter()
    windows = fermi_windows(problem.samples, cfg.samples, cfg.seqlen, problem.seed)
    batches = list(windows.split(cfg.batch_size))
    states = runner.embed(batches)
    teacher = teacher_topk(runner, states, cfg.top_k) if cfg.loss == "kl" else None
    masks = DobiMasks(problem, cfg, initial_theta(problem))
    theta, device = masks.theta, problem.device
    N = full_ranks(problem)
    lo = (torch.tensor([float(min(cfg.r_min, n)) for n in N.tolist()], dtype=torch.float64) / N).float().to(device)
    hi = (torch.tensor([open_position(int(n), cfg.beta, cfg.cutoff) for n in N.tolist()], dtype=torch.float64)
          / N).float().to(device)
    ratio_t = problem.target / problem.dense
    opt = torch.optim.Adam([theta], lr=cfg.lr)
    g = torch.Generator().manual_seed(problem.seed)
    order = torch.cat([torch.randperm(len(states), generator=g)
                       for _ in range(math.ceil(cfg.steps / len(states)) + 1)]).tolist()
    tail = max(1, cfg.steps // 4)
    grad_sum, history = torch.zeros_like(theta), []
    bar = tqdm(range(cfg.steps), desc="dobi", disable=not problem.progress)
    for step in bar:
        b = order[step]
        cosine = 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:  # cosine from lr to lr·lr_final
            group["lr"] = cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * cosine)

        opt.zero_grad(set_to_none=True)
        t_b = teacher[b] if teacher is not None else None
        task = runner.backward([states[b]], lambda _j, h, b=b, t_b=t_b: task_loss(runner, h, batches[b], t_b),
                               overrides=masks.overrides())
        g_task = theta.grad.detach().clone() if theta.grad is not None else torch.zeros_like(theta)
        size = smooth_size(theta, problem)
        reg = cfg.lambda_reg * (size / problem.dense - ratio_t).abs()
        reg.backward()  # adds to θ.grad
        opt.step()
        with torch.no_grad():
            theta.copy_(torch.maximum(torch.minimum(theta, hi), lo))
        if step >= cfg.steps - tail:
            grad_sum += g_task
        ratio = float(size.detach()) / problem.dense
        bar.set_postfix(loss=f"{task:.4f}", ratio=f"{ratio:.4f}")
        history.append({"step": step, "task_loss": task, "ratio": ratio, "reg": float(reg.detach())})
    k = (theta.detach().cpu().double() * N).tolist()
    dloss_dk = (grad_sum.cpu().double() / tail / N).tolist()  # ∂loss/∂k = ∂loss/∂θ / N
    names = masks.names
    return {"k": dict(zip(names, k)), "dloss_dk": dict(zip(names, dloss_dk)), "history": history,
            "train_s": time.perf_counter() - t0, "tokens_per_step": cfg.batch_size * windows.shape[1],
            "masks": masks, "states": states, "batches": batches, "teacher": teacher}


@allocator("dobi", options=DobiConfig)
def dobi(problem: AllocationProblem) -> Allocation:
    cfg = fill_config(DobiConfig, problem.options, "dobi")
    if problem.ratio >= 1:
        return Allocation({name: None for name in problem.shapes}, {"note": "ratio 1: everything dense"})
    torch.manual_seed(problem.seed)
    run = train(problem, cfg)
    ranks, moves = hard_ranks(problem, run["k"], run["dloss_dk"], cfg.r_min)
    final = {n: (None if r >= problem.shapes[n].full_rank else r) for n, r in ranks.items()}
    tail = run["history"][-max(1, cfg.steps // 4):]
    info: dict[str, Any] = {
        "config": asdict(cfg),
        "steps": cfg.steps,
        "tokens_per_step": run["tokens_per_step"],
        "train_time_s": round(run["train_s"], 2),
        "final_task_loss": sum(h["task_loss"] for h in tail) / len(tail),
        "smooth_ratio_final": run["history"][-1]["ratio"],
        "adjust_moves": moves,
        "k": {n: round(v, 3) for n, v in run["k"].items()},
        "history": run["history"][::max(1, cfg.steps // 50)],
        "objective": f"{cfg.loss} + lambda_reg*|ratio(k) - target|, Adam, cosine lr",
    }
    info[f"{cfg.loss}_dobi"] = hard_loss(run, final)  # the hard cut that will be built, on the training windows
    if cfg.report_uniform:
        from .uniform import uniform

        info[f"{cfg.loss}_uniform"] = hard_loss(run, uniform(problem).ranks)
    return Allocation(final, info)
