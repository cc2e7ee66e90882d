"""Sequential, block-by-block calibration: the only place that runs calibration forwards.

As in GPTQ, the model runs up to the first decoder block once; then each block in turn is moved to the device,
fed the previous block's outputs, and its target layers' inputs are summarized by forward hooks. Only one
block's activations live in memory at a time, so a model larger than the device is handled block by block.

Layers that read the same input tensor (q/k/v; gate/up) share one `InputStats`: the hooks see the very same
tensor object and accumulate it once. Accumulation is a float32 matmul per batch summed into float64.

Methods that weight by the loss (kfac, fwsvd) also need `gradient_stats`: one forward + backward of the whole
model per batch of samples (frozen parameters, so memory is one batch's activations plus the statistics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .models import find_blocks, find_targets


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
        self.xtx += (x.T @ x).double()  # float32 block, float64 sum
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


class _Stop(Exception):
    pass


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _move_outside_blocks(model: nn.Module, prefix: str, device) -> None:
    """Move everything but the decoder blocks (embeddings, rotary, norms) to `device`."""
    for name, child in model.named_modules():
        if name and (name == prefix or name.startswith(prefix + ".")):
            continue
        for pname, p in list(child.named_parameters(recurse=False)) + list(child.named_buffers(recurse=False)):
            p.data = p.data.to(device)


@torch.no_grad()
def block_inputs(model: nn.Module, samples: torch.Tensor, batch_size: int, device) -> list[tuple]:
    """Run the model up to block 0 and capture (hidden_states, kwargs) for each batch of samples."""
    prefix, blocks = find_blocks(model)
    captured: list[tuple] = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_value", "past_key_values")}
        captured.append((hidden, kwargs))
        raise _Stop

    _move_outside_blocks(model, prefix, device)
    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, len(samples), batch_size):
            try:
                model(input_ids=samples[i:i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        _move_outside_blocks(model, prefix, "cpu" if device != "cpu" else device)
    return captured


def iter_block_stats(model: nn.Module, samples: torch.Tensor, batch_size: int = 8, device="cpu",
                     progress: bool = True, offload: Optional[str] = None) -> Iterator[BlockStats]:
    """Yield each block's input statistics, in order, running the dense model block by block.

    `offload`: where block activations wait between blocks ("cpu" keeps GPU memory to one block's worth).
    """
    prefix, blocks = find_blocks(model)
    targets = find_targets(model)
    by_block: dict[int, list] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t)
    home = next(model.parameters()).device
    states = block_inputs(model, samples, batch_size, device)
    park = offload or device
    states = [(_to(h, park), kw) for h, kw in states]

    for i in tqdm(range(len(blocks)), desc="calibrate", unit="block", disable=not progress):
        block = blocks[i].to(device)
        stats: dict[str, InputStats] = {}
        seen: list[tuple[torch.Tensor, InputStats]] = []  # input tensors of this batch (held: no address reuse)

        def hook(name: str, n: int):
            def fn(_m, args, _out):
                x = args[0]
                for t, s in seen:
                    if t is x:  # same tensor as a sibling layer: share its statistics
                        stats.setdefault(name, s)
                        return
                s = stats.setdefault(name, InputStats.zeros(n, x.device))
                s.add(x)
                seen.append((x, s))
            return fn

        handles = [model.get_submodule(t.name).register_forward_hook(hook(t.name, t.shape.n))
                   for t in by_block.get(i, [])]
        with torch.no_grad():
            for j, (h, kw) in enumerate(states):
                seen.clear()
                out = block(_to(h, device), **_to(kw, device))
                out = out[0] if isinstance(out, tuple) else out
                states[j] = (_to(out, park), kw)
        seen.clear()
        for hd in handles:
            hd.remove()
        blocks[i].to(home)
        yield _finish(i, stats)


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
#   weight_fisher F = Σ_s (∂L_s/∂W)², ∂L_s/∂W = Σ_{t∈s} g_t x_tᵀ  (m, n)  per sequence s (Hsu et al. 2022)
# so that ½ vec(ΔW)ᵀ (C ⊗ G / N) vec(ΔW) ≈ the increase of the summed loss (K-FAC: E[xxᵀ⊗ggᵀ] ≈ E[xxᵀ]⊗E[ggᵀ]).
# Every factorizer is invariant to a global scale of its statistics, so only allocators see the normalization.
# ---------------------------------------------------------------------------------------------------------------

GradStats = dict[str, dict[str, torch.Tensor]]


class _GradAccumulator:
    """Hooks on every target layer: the forward hook keeps the input x and registers a tensor hook on the
    output y, which receives g = ∂L/∂y in the backward pass and adds g's statistics (float32 blocks summed into
    float64)."""

    def __init__(self, model: nn.Module, device, fisher: bool) -> None:
        self.fisher = fisher
        self.stats: dict[str, dict[str, torch.Tensor]] = {}
        self.handles = [model.get_submodule(t.name).register_forward_hook(self._forward(t.name, t.shape.m, t.shape.n,
                                                                                        device))
                        for t in find_targets(model)]

    def _forward(self, name: str, m: int, n: int, device):
        def fn(_module, args, out):
            if not out.requires_grad:
                return
            x = args[0].detach()
            out.register_hook(lambda g: self._backward(name, m, n, device, x, g))
        return fn

    def _backward(self, name: str, m: int, n: int, device, x: torch.Tensor, g: torch.Tensor) -> None:
        s = self.stats.setdefault(name, {"out_grad": torch.zeros(m, m, dtype=torch.float64, device=device)})
        g = g.float()
        gt = g.reshape(-1, m)
        s["out_grad"] += (gt.T @ gt).double()  # G += Σ_t g_t g_tᵀ
        if self.fisher:
            b = g.shape[0]
            dW = torch.einsum("btm,btn->bmn", g.reshape(b, -1, m), x.float().reshape(b, -1, n))  # ∂L_s/∂W
            s.setdefault("weight_fisher", torch.zeros(m, n, dtype=torch.float64, device=device))
            s["weight_fisher"] += (dW ** 2).sum(0).double()  # F += Σ_s (∂L_s/∂W)²

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _next_token_nll_sum(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """L = Σ_t −log p(x_{t+1} | x_≤t) over the batch (sum reduction, float32 log-softmax)."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="sum")


def gradient_stats(model: nn.Module, samples: torch.Tensor, batch_size: int = 4, device="cpu",
                   progress: bool = True, fisher: bool = True) -> GradStats:
    """Token-wise output-gradient factors G (and per-sequence weight Fisher F) of every target layer.

    Parameters are frozen (no weight gradients are formed: the graph starts at the embedding output, which is
    made to require grad), and samples run in batches of `batch_size`, so memory is one batch's activations plus
    the statistics. The whole model is moved to `device` for the pass and back afterwards.
    """
    home = next(model.parameters()).device
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    emb = model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
    acc = _GradAccumulator(model, device, fisher)
    model.to(device)
    try:
        with torch.enable_grad():
            for i in tqdm(range(0, len(samples), batch_size), desc="gradients", unit="batch", disable=not progress):
                _next_token_nll_sum(model, samples[i:i + batch_size].to(device)).backward()
    finally:
        acc.remove()
        emb.remove()
        model.to(home)
        for p, rg in frozen:
            p.requires_grad_(rg)
    return {name: {k: v.cpu() for k, v in s.items()} for name, s in acc.stats.items()}
