"""Sequential, block-by-block calibration: the only place that runs calibration forwards.

As in GPTQ, the model runs up to the first decoder block once; then each block in turn is brought to the device
by the runner (model/runner.py), fed the previous block's outputs, and its target layers' inputs are summarized
by forward hooks. Only one block's weights are needed at a time, so a model larger than memory is handled
block by block.

Layers that read the same input tensor (q/k/v; gate/up) share one `InputStats`: the hooks see the very same
tensor object and accumulate it once. Accumulation is a float32 matmul per batch summed into float64.

Methods that weight by the loss (kfac, gfwsvd, fwsvd) also need `gradient_stats`: one forward + backward through the
blocks (frozen parameters; per-block recomputation when streamed).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from tqdm.auto import tqdm

from . import distributed as dist
from .memory import trim
from .model.head import nll_sum


ROWS = 1024  # rows of a Gram matrix accumulated per matmul: bounds the float32/float64 temporaries


def add_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += xᵀx: float32 matmuls summed into the float64 accumulator, ROWS rows at a time, so an 8192-wide
    input needs 32+64 MB of temporaries instead of 256+512 MB."""
    for r in range(0, x.shape[1], ROWS):
        acc[r:r + ROWS] += (x[:, r:r + ROWS].T @ x).double()


@dataclass
class InputStats:
    """Second moments of one layer input over calibration tokens: C = Σ_t x_t x_tᵀ (and Σ_t |x_t| for ASVD)."""

    xtx: torch.Tensor  # (n, n) float64
    abs_sum: torch.Tensor  # (n,) float64
    tokens: int = 0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)  # whiteners shared by a group

    @classmethod
    def zeros(cls, n: int, device) -> "InputStats":
        return cls(torch.zeros(n, n, dtype=torch.float64, device=device),
                   torch.zeros(n, dtype=torch.float64, device=device))

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        add_gram(self.xtx, x)
        self.abs_sum += x.abs().sum(0).double()
        self.tokens += x.shape[0]

    def cpu(self) -> "InputStats":
        return InputStats(self.xtx.cpu(), self.abs_sum.cpu(), self.tokens)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


@dataclass
class BlockStats:
    block: int
    inputs: dict[str, InputStats]  # layer name -> stats; layers that share an input share the object
    groups: list[list[str]]  # names of layers reading the same input


@contextmanager
def using_runner(model_or_runner, device="cpu"):
    """The runner of `model_or_runner`: itself, or for a plain nn.Module one with the whole model on `device`
    (closed afterwards, which restores the model's requires_grad flags)."""
    from .model import Placement, Runner

    if isinstance(model_or_runner, Runner):
        yield model_or_runner
        return
    with Runner(model_or_runner, Placement(device=str(device), offload="none")) as runner:
        yield runner


def iter_block_stats(model_or_runner, samples: torch.Tensor, batch_size: int = 8, device="cpu",
                     progress: bool = True) -> Iterator[BlockStats]:
    """Yield each block's input statistics, in order, running the dense model block by block through the runner
    (which decides where the block's weights come from and where activations wait in between)."""
    with using_runner(model_or_runner, device) as runner:
        yield from _block_stats(runner, samples, batch_size, progress)


def _block_stats(runner, samples: torch.Tensor, batch_size: int, progress: bool) -> Iterator[BlockStats]:
    """Under torchrun each rank runs its shard of the batches and the block's sums are all-reduced before they
    are handed on, so every rank holds the same statistics (the sums of one process, up to rounding)."""
    model = runner.model
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    states = runner.embed(dist.shard(batches, "calibration batches (--calib-samples / --calib-batch-size)"))

    for i in tqdm(range(len(runner.blocks)), desc="calibrate", unit="block", disable=not progress):
        stats: dict[str, InputStats] = {}
        seen: list[tuple[torch.Tensor, InputStats]] = []  # input tensors of this batch (held: no address reuse)

        def hook(name: str, n: int):
            def fn(_m, args, _out):
                x = args[0]
                for t, s in seen:
                    if t is x:  # same tensor as a sibling layer: share its statistics
                        stats.setdefault(name, s)
                        return
                s = stats.get(name)
                if s is None:  # (not setdefault: that would build a new n×n zero matrix on every batch)
                    s = stats[name] = InputStats.zeros(n, x.device)
                s.add(x)
                seen.append((x, s))
            return fn

        with runner.block(i) as _blk, torch.no_grad():
            handles = [model.get_submodule(t.name).register_forward_hook(hook(t.name, t.shape.n))
                       for t in runner.arch.in_block(i)]
            try:
                for j, (h, kw) in enumerate(states):
                    seen.clear()
                    states[j] = (runner.park(runner.run(_blk, h, kw)), kw)
            finally:
                seen.clear()
                for hd in handles:
                    hd.remove()
        for t in runner.arch.in_block(i):  # a layer the batches never reached (an expert no token was routed to)
            if t.name not in stats:
                stats[t.name] = InputStats.zeros(t.shape.n, runner.device)
        # one order for every rank: the architecture's (the order hooks met inputs in depends on the routing)
        stats = {t.name: stats[t.name] for t in runner.arch.in_block(i)}
        _all_reduce_inputs(stats)
        out = _finish(i, stats)
        stats = seen = None  # the suspended generator must not keep this block's X·Xᵀ alive (the consumer
        yield out            # frees each one as soon as it is whitened),
        out = None           # nor, once resumed, this block's statistics and whiteners during the next block


def _all_reduce_inputs(stats: dict[str, InputStats]) -> None:
    """Sum one block's input statistics over ranks (a no-op in one process): X·Xᵀ, Σ|x| and the token count of
    each distinct input, in the order the hooks met them (the same forward order on every rank)."""
    if not dist.active():
        return
    unique = list({id(s): s for s in stats.values()}.values())
    for s in unique:
        tokens = torch.tensor([float(s.tokens)], dtype=torch.float64, device=s.xtx.device)
        dist.all_reduce_sum([s.xtx, s.abs_sum, tokens], "calibration statistics")
        s.tokens = int(tokens.item())


def _finish(block: int, stats: dict[str, InputStats]) -> BlockStats:
    moved: dict[int, InputStats] = {}
    groups: dict[int, list[str]] = {}
    out = {}
    for name, s in stats.items():
        key = id(s)
        if key not in moved:
            moved[key] = s.cpu()
        out[name] = moved[key]
        groups.setdefault(key, []).append(name)
    return BlockStats(block, out, list(groups.values()))


# ---------------------------------------------------------------------------------------------------------------
# Gradient statistics (KFAC-SVD, FWSVD): one backward pass over the calibration samples, shared by every method.
#
# Normalization. The loss of a batch is the SUM of the next-token NLLs (not the mean), so the gradient g_t of a
# token's layer output does not shrink with the batch size or the sequence length (a mean loss would scale every
# g_t by 1/(B·T), and G by 1/(B·T)²). With N calibration tokens the statistics are raw sums:
#   out_grad      G = Σ_t g_t g_tᵀ                      (m, m)  token-wise: each token's own outer product
#   out_grad_seq  G_seq = Σ_s ḡ_s ḡ_sᵀ, ḡ_s = Σ_{t∈s} g_t  (m, m)  per sequence (GFWSVD's estimator): rank ≤ #seqs
#   weight_fisher F = Σ_s (∂L_s/∂W)², ∂L_s/∂W = Σ_{t∈s} g_t x_tᵀ  (m, n)  per sequence s (Hsu et al. 2022)
# so that ½ vec(ΔW)ᵀ (C ⊗ G / N) vec(ΔW) ≈ the increase of the summed loss (K-FAC: E[xxᵀ⊗ggᵀ] ≈ E[xxᵀ]⊗E[ggᵀ]).
# Every factorizer is invariant to a global scale of its statistics, so only allocators see the normalization.
# ---------------------------------------------------------------------------------------------------------------

GradStats = dict[str, dict[str, torch.Tensor]]

OUT_GRAD_KINDS = {"token": ("out_grad",), "sequence": ("out_grad_seq",), "both": ("out_grad", "out_grad_seq")}


def check_out_grad(kind: str) -> tuple[str, ...]:
    """The statistics keys gathered for an `out_grad` option (token | sequence | both)."""
    from .errors import SvdpressError

    if kind not in OUT_GRAD_KINDS:
        raise SvdpressError(f"out_grad must be one of {', '.join(OUT_GRAD_KINDS)}; got {kind!r}")
    return OUT_GRAD_KINDS[kind]


class _GradAccumulator:
    """Hooks on target layers: the forward hook keeps the input x and registers a tensor hook on the output y,
    which receives g = ∂L/∂y in the backward pass and adds g's statistics (float32 blocks summed into
    float64)."""

    def __init__(self, device, fisher: bool, out_grad: str = "token") -> None:
        self.device, self.fisher = device, fisher
        self.keys = check_out_grad(out_grad)
        self.stats: dict[str, dict[str, torch.Tensor]] = {}

    def forward(self, name: str, m: int, n: int):
        """The forward hook of one layer (registered by the runner's backward for the block being recomputed)."""
        def fn(_module, args, out):
            if not out.requires_grad:
                return
            x = args[0].detach()
            out.register_hook(lambda g: self._backward(name, m, n, self.device, x, g))
        return fn

    def zeros(self, m: int, n: int) -> dict[str, torch.Tensor]:
        z = {k: torch.zeros(m, m, dtype=torch.float64, device=self.device) for k in self.keys}
        if self.fisher:
            z["weight_fisher"] = torch.zeros(m, n, dtype=torch.float64, device=self.device)
        return z

    def _backward(self, name: str, m: int, n: int, device, x: torch.Tensor, g: torch.Tensor) -> None:
        s = self.stats.get(name)
        if s is None:  # built once (setdefault would zero a new m×m float64 matrix on every batch)
            s = self.stats[name] = self.zeros(m, n)
        g = g.float()
        # a sequence is a row of the batch; a routed expert sees a flat list of tokens (no sequence axis): each
        # of its calls then counts as one sequence
        b = g.shape[0] if g.dim() == 3 else 1
        if "out_grad" in s:
            add_gram(s["out_grad"], g.reshape(-1, m))  # G += Σ_t g_t g_tᵀ
        if "out_grad_seq" in s:  # G_seq += Σ_s ḡ_s ḡ_sᵀ: one (summed) gradient per sequence of the batch
            add_gram(s["out_grad_seq"], g.reshape(b, -1, m).sum(1))
        if self.fisher:
            dW = torch.einsum("btm,btn->bmn", g.reshape(b, -1, m), x.float().reshape(b, -1, n))  # ∂L_s/∂W
            s["weight_fisher"] += (dW ** 2).sum(0).double()  # F += Σ_s (∂L_s/∂W)²


def gradient_stats(model_or_runner, samples: torch.Tensor, batch_size: int = 4, device="cpu",
                   progress: bool = True, fisher: bool = True, keep=None, out_grad: str = "token") -> GradStats:
    """Output-gradient factors G (and per-sequence weight Fisher F) of every target layer.

    `out_grad` chooses the estimator of G: "token" (KFAC-SVD's Σ_t g_t g_tᵀ, key out_grad), "sequence"
    (GFWSVD's Σ_s ḡ_s ḡ_sᵀ with ḡ_s summed over the sequence, key out_grad_seq), or "both" (one pass, both keys:
    to compare them). One backward pass serves every estimator: they differ only in how g is summed.

    The loss is the summed next-token NLL, computed over the vocabulary in chunks (model/head.py). The runner
    back-propagates block by block (recomputing each block from its saved input when the model is streamed),
    with parameters frozen, so memory is one block's weights and activations plus that block's statistics.
    Each block's statistics are handed to `keep(name, stats)` as soon as its backward is done (default: moved
    to the CPU and kept in the returned dict; a disk-backed store keeps them out of memory)."""
    keys = check_out_grad(out_grad)  # before any heavy work
    with using_runner(model_or_runner, device) as runner:
        return _gradient_stats(runner, samples, batch_size, progress, fisher, keep, out_grad, len(keys))


def _gradient_stats(runner, samples, batch_size, progress, fisher, keep, out_grad, n_grams) -> GradStats:
    out: dict[str, dict[str, torch.Tensor]] = {}
    keep = keep or (lambda name, s: out.__setitem__(name, s))
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    batches = dist.shard(batches, "calibration batches (--calib-samples / --calib-batch-size)")  # this rank's
    states = runner.embed(batches)
    acc = _GradAccumulator(runner.device, fisher, out_grad)

    def loss_fn(j: int, h: torch.Tensor) -> torch.Tensor:
        ids = batches[j].to(h.device)
        hn = runner.final(h)[:, :-1]
        return nll_sum(runner.head, hn.reshape(-1, hn.shape[-1]), ids[:, 1:].reshape(-1))

    cap = dist.min_int(runner.budget() // 4)  # every rank must split a block into the same passes
    parts = [_passes(runner.arch.in_block(i), fisher, cap, n_grams) for i in range(len(runner.blocks))]

    pending: list = []  # the layers of the pass under way

    def hook(i: int, _blk, p: int) -> list:
        done(i)  # the previous pass's layers are complete
        pending.extend(parts[i][p])
        return [runner.model.get_submodule(t.name).register_forward_hook(acc.forward(t.name, t.shape.m, t.shape.n))
                for t in parts[i][p]]

    def done(i: int) -> None:
        for t in pending:  # every layer of the pass, in one order on every rank (an expert no token was routed
            s = acc.stats.pop(t.name, None) or acc.zeros(t.shape.m, t.shape.n)  # to has zero statistics)
            dist.all_reduce_sum([s[k] for k in sorted(s)], "gradient statistics")  # over ranks' batches
            keep(t.name, {k: v.cpu() for k, v in s.items()})
        pending.clear()
        trim()  # the pass's autograd temporaries go back to the system, not into the next pass's peak

    bar = tqdm(total=len(runner.blocks), desc="gradients", unit="block", disable=not progress)
    with torch.enable_grad():
        runner.backward(states, loss_fn, hook=hook, on_block_done=lambda i: (done(i), bar.update()),
                        passes=lambda i: len(parts[i]))
    bar.close()
    return out


def _passes(targets: list, fisher: bool, cap: int, n_grams: int = 1) -> list[list]:
    """The block's layers split into backward passes whose statistics (8m² bytes per G, + 8mn of Fisher, each)
    stay under `cap` together: one pass when they fit, as for any model whose block is small next to the memory
    budget; a Llama-3-8B MLP's two 14336-wide G (1.6 GB each) get a pass each under a small one."""
    out: list[list] = [[]]
    used = 0
    for t in sorted(targets, key=lambda t: t.shape.m):
        size = 8 * t.shape.m * (n_grams * t.shape.m + (t.shape.n if fisher else 0))
        if out[-1] and used + size > cap:
            out.append([])
            used = 0
        out[-1].append(t)
        used += size
    return out


@torch.no_grad()
def head_input_stats(runner, samples: torch.Tensor, batch_size: int) -> InputStats:
    """C = Σ_t x_t x_tᵀ of what the LM head reads (the final norm's output, after OPT's project_out), over the
    calibration tokens: one more pass embed → blocks → final, for `--lm-head`."""
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    stats = None
    for h in runner.forward(runner.embed(batches)):
        x = runner.final(h)
        if stats is None:
            stats = InputStats.zeros(x.shape[-1], x.device)
        stats.add(x)
    return stats.cpu()
