"""Mixture-of-experts: experts as factorization targets, routed statistics and a factored experts module.

In transformers 5 an MoE block keeps its experts as fused 3-D parameters in an `*Experts` module
(`gate_up_proj`: (E, 2f, d), `down_proj`: (E, d, f)) whose forward(hidden_states, top_k_index, top_k_weights)
runs every hit expert on the tokens routed to it. svdpress's discovery lists nn.Linear only, so without this
module the experts are silently left dense (the routers are their own module type and are never targets).

Here each expert's two matrices are targets of their own: W_gu[e] (2f × d, gate and up factored fused, as one
matrix, like other fused projections) and W_down[e] (d × f). The statistics of an expert count only the tokens
routed to it (Zhang et al. and the MoE-SVD papers: an expert's input distribution is its routed tokens, not the
whole stream):
    G_gu[e]   = Σ_{t routed to e} x_t x_tᵀ                       x_t: the block's hidden state
    G_down[e] = Σ_{t routed to e} h_t h_tᵀ,  h_t = act(gate_e x_t) ⊙ (up_e x_t)
accumulated as float32 matmuls into float64, like calibrate.py. The router weights top_k_weights scale the
expert's *output*, not its input, so they do not enter G.

An expert that saw fewer than `MIN_TOKENS` tokens (its Gram has rank < MIN_TOKENS, usually far below d) falls
back to plain SVD of its weight (whitening with an almost-empty Gram would only fit the few tokens seen); the
caller records which experts fell back.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn

from .errors import SvdpressError
from .lowrank import FactoredExperts, set_module

MIN_TOKENS = 16  # fewer routed tokens than this: the expert falls back to plain SVD


def is_experts(m: nn.Module) -> bool:
    """A fused experts module: 3-D gate_up_proj (E, 2f, d) and down_proj (E, d, f) parameters."""
    gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3
            and gu.shape[0] == down.shape[0] and gu.shape[2] == down.shape[1] and gu.shape[1] == 2 * down.shape[2])


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every fused experts module in the model, by dotted name."""
    return {n: m for n, m in model.named_modules() if is_experts(m) or isinstance(m, FactoredExperts)}


def expert_targets(model: nn.Module) -> list[tuple[str, int, int]]:
    """One target per expert and per projection: (name, out_features, in_features), name like
    `model.layers.0.mlp.experts.3.gate_up_proj`."""
    out = []
    for name, m in experts_modules(model).items():
        if isinstance(m, FactoredExperts):
            continue
        E, f2, d = m.gate_up_proj.shape
        for e in range(E):
            out.append((f"{name}.{e}.gate_up_proj", f2, d))
            out.append((f"{name}.{e}.down_proj", d, f2 // 2))
    return out


def _call_args(args, kwargs):
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args) + [kwargs[k] for k in names[len(args):]]
    return vals[0], vals[1]


class RoutedStats:
    """Forward pre-hooks on experts modules that accumulate each expert's routed Gram matrices (float64) and
    token counts. Use as a context manager around calibration forwards."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = {n: m for n, m in experts_modules(model).items() if is_experts(m)}
        if not self.modules:
            raise SvdpressError(f"{type(model).__name__} has no fused experts module (3-D gate_up_proj/down_proj)")
        self.gram: dict[str, torch.Tensor] = {}  # target name → (n, n) float64
        self.tokens: dict[str, int] = {}
        self._handles = []

    def __enter__(self) -> "RoutedStats":
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(m, args, kwargs):
            x, idx = _call_args(args, kwargs)
            self.add(name, m, x, idx)
        return hook

    @torch.no_grad()
    def add(self, name: str, m: nn.Module, x: torch.Tensor, top_k_index: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        E = m.gate_up_proj.shape[0]
        for e in range(E):
            tok = (top_k_index == e).any(dim=-1).nonzero().flatten()
            key_gu, key_down = f"{name}.{e}.gate_up_proj", f"{name}.{e}.down_proj"
            self.tokens[key_gu] = self.tokens.get(key_gu, 0) + int(tok.numel())
            self.tokens[key_down] = self.tokens[key_gu]
            if tok.numel() == 0:
                continue
            xe = x[tok].float()
            gate, up = (xe @ m.gate_up_proj[e].float().T).chunk(2, dim=-1)
            he = m.act_fn(gate) * up
            for key, v in ((key_gu, xe), (key_down, he)):
                g = (v.T @ v).double()
                if not torch.isfinite(g).all():
                    raise SvdpressError(f"non-finite activations reaching {key}")
                self.gram[key] = self.gram[key] + g if key in self.gram else g


def _factor(W: torch.Tensor, G: Optional[torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM: W ≈ A·B minimising ‖(W − A B) S‖ with S Sᵀ = G (Cholesky, eigen fallback if G is singular);
    G None → plain SVD of W. Returns A (m, r), B (r, n) in float64."""
    W = W.double()
    if G is None:
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :rank] * s[:rank], Vh[:rank]
    L, info = torch.linalg.cholesky_ex(G)
    if info != 0:  # singular: eigen fallback S = V √max(λ, ε)
        lam, V = torch.linalg.eigh(G)
        lam = lam.clamp_min(lam.max().clamp_min(1e-30) * 1e-10)
        S, Sinv = V * lam.sqrt(), (V / lam.sqrt()).T
    else:
        S, Sinv = L, torch.linalg.inv(L)
    U, s, Vh = torch.linalg.svd(W @ S, full_matrices=False)
    return U[:, :rank] * s[:rank], Vh[:rank] @ Sinv


@torch.no_grad()
def factor_experts(m: nn.Module, ranks_gu, ranks_down, grams: Optional[Mapping[str, torch.Tensor]] = None,
                 tokens: Optional[Mapping[str, int]] = None, prefix: str = "",
                 min_tokens: int = MIN_TOKENS) -> tuple[FactoredExperts, list[int]]:
    """Factor every expert of `m` (SVD-LLM with its routed Gram; plain SVD for experts with fewer than
    `min_tokens` routed tokens or when `grams` is None). Returns the module and the experts that fell back."""
    E, f2, d = m.gate_up_proj.shape
    if len(ranks_gu) != E or len(ranks_down) != E:
        raise SvdpressError(f"{prefix or 'experts'}: need {E} ranks per projection, got "
                            f"{len(ranks_gu)} and {len(ranks_down)}")
    for r, lim, what in [(r, min(f2, d), "gate_up") for r in ranks_gu] + \
                        [(r, min(f2 // 2, d), "down") for r in ranks_down]:
        if not 1 <= r <= lim:
            raise SvdpressError(f"{prefix or 'experts'}: {what} rank {r} outside 1..{lim}")
    dtype = m.gate_up_proj.dtype
    new = FactoredExperts(E, d, f2 // 2, ranks_gu, ranks_down, m.act_fn, dtype=dtype, device=m.gate_up_proj.device)
    fell_back = []
    for e in range(E):
        key = f"{prefix}.{e}" if prefix else str(e)
        seen = (tokens or {}).get(f"{key}.gate_up_proj", 0)
        use = grams is not None and seen >= min_tokens
        if not (torch.isfinite(m.gate_up_proj[e]).all() and torch.isfinite(m.down_proj[e]).all()):
            raise SvdpressError(f"non-finite weights in expert {e} of {prefix or 'experts'}")
        if grams is not None and not use:
            fell_back.append(e)
        for W, r, proj, A, B in ((m.gate_up_proj[e], ranks_gu[e], "gate_up_proj", new.gu_A, new.gu_B),
                                 (m.down_proj[e], ranks_down[e], "down_proj", new.down_A, new.down_B)):
            a, b = _factor(W, grams[f"{key}.{proj}"] if use else None, r)
            A[e].copy_(a.to(dtype))
            B[e].copy_(b.to(dtype))
    return new, fell_back


def uniform_rank(m: int, n: int, ratio: float) -> int:
    """The rank keeping `ratio` of an m × n matrix's parameters as r(m + n) (at least 1, at most min(m, n))."""
    return max(1, min(min(m, n), int(ratio * m * n / (m + n))))


@torch.no_grad()
def compress_experts(model: nn.Module, batches, ratio: float, min_tokens: int = MIN_TOKENS) -> dict:
    """SVD-LLM + uniform on every expert of an in-memory model: routed Grams from `batches` (token-id tensors),
    each expert matrix at `uniform_rank`, experts with fewer than `min_tokens` routed tokens by plain SVD.
    Returns {"experts": {module: {"ranks_gu", "ranks_down", "tokens", "fell_back"}}} for the manifest."""
    if not 0 < ratio <= 1:
        raise SvdpressError(f"ratio must be in (0, 1], got {ratio}")
    with RoutedStats(model) as st:
        for x in batches:
            model(x)
    report = {}
    for name, m in list(experts_modules(model).items()):
        if isinstance(m, FactoredExperts):
            continue
        E, f2, d = m.gate_up_proj.shape
        ranks_gu = [uniform_rank(f2, d, ratio)] * E
        ranks_down = [uniform_rank(d, f2 // 2, ratio)] * E
        new, fell = factor_experts(m, ranks_gu, ranks_down, st.gram, st.tokens, prefix=name, min_tokens=min_tokens)
        set_module(model, name, new)
        report[name] = {"ranks_gu": ranks_gu, "ranks_down": ranks_down, "fell_back": fell,
                        "tokens": [st.tokens.get(f"{name}.{e}.gate_up_proj", 0) for e in range(E)]}
    return {"experts": report, "min_tokens": min_tokens}
