"""Factorizations: each turns a weight and its calibration statistics into a `LayerSpectrum`.

A spectrum holds the whole decomposition W = U·diag(S)·V (V with any whitening already undone), ordered so
that keeping the first r terms is the method's best rank-r approximation. Any rank can then be cut later
(by the allocators, or FermiGrad's soft masks) without recomputing anything.

Methods register themselves by name: `FACTORIZERS["svd-llm"]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..calibrate import InputStats
from ..registry import Registry


@dataclass
class LayerStats:
    """Everything a factorizer may use about one layer; gradient statistics only for methods that ask for them."""

    inputs: InputStats  # input-side second moments (shared by layers reading the same input)
    out_grad: Optional[torch.Tensor] = None  # (m, m) float64: Σ_t g_t g_tᵀ, g = ∂loss/∂(layer output), token-wise
    weight_fisher: Optional[torch.Tensor] = None  # (m, n) float64: Σ_samples (∂loss/∂W)² (FWSVD)
    extra: dict = field(default_factory=dict)
    consume: bool = False  # W and the gradient statistics are this call's own: they may be overwritten as used


@dataclass
class LayerSpectrum:
    """W ≈ U[:, :r] · diag(S[:r]) · V[:r] for any r ≤ k. S are the singular values of the problem the method
    truncates (the whitened weight for data-aware methods), so Σ_{j≥r} S_j² is its truncation error."""

    U: torch.Tensor  # (m, k) float32
    S: torch.Tensor  # (k,) float64, descending
    V: torch.Tensor  # (k, n) float32
    note: str = ""  # numerical events worth recording (jitter added, eigen fallback)

    @property
    def full_rank(self) -> int:
        return self.S.numel()

    def factors(self, r: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """A = U_r·diag(√S_r) (m, r), B = diag(√S_r)·V_r (r, n): the singular values split evenly between the two
        factors keeps both in a similar range, which matters once they are cast to 16-bit."""
        s = self.S[:r].sqrt()
        A = self.U[:, :r].double() * s
        B = s[:, None] * self.V[:r].double()
        return A.to(dtype), B.to(dtype)

    def weight(self, r: Optional[int] = None) -> torch.Tensor:
        """The rank-r reconstruction (float64), for tests and error measurements."""
        r = self.full_rank if r is None else r
        return (self.U[:, :r].double() * self.S[:r]) @ self.V[:r].double()

    def tail_energy(self, r: int) -> float:
        """Σ_{j≥r} S_j²: the method's own truncation error at rank r."""
        return float((self.S[r:] ** 2).sum())


@dataclass(frozen=True)
class Factorizer:
    fn: Callable[[torch.Tensor, LayerStats], LayerSpectrum]  # (W float64 (m, n), stats) -> spectrum
    needs_gradients: bool = False  # calibration must run a backward pass to gather out_grad
    description: str = ""
    needs_fisher: bool = False  # the pass must also gather the per-sequence weight Fisher (m×n float64 a layer)


FACTORIZERS: Registry[Factorizer] = Registry("factorization", __name__)


def register_factorizer(name: str, needs_gradients: bool = False, description: str = "", needs_fisher: bool = False):
    def deco(fn):
        FACTORIZERS.register(name)(Factorizer(fn, needs_gradients or needs_fisher, description, needs_fisher))
        return fn
    return deco


def spectrum_from_svd(M: torch.Tensor, right: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                      left: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, note: str = "") -> LayerSpectrum:
    """SVD of the (whitened) matrix M = U S Vh; `left`/`right` undo the whitening on U and Vh."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    U = left(U) if left else U
    V = right(Vh) if right else Vh
    return LayerSpectrum(U.float(), S, V.float(), note)
