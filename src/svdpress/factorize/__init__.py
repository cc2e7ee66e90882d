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
    out_grad_seq: Optional[torch.Tensor] = None  # (m, m) float64: Σ_s ḡ_s ḡ_sᵀ, ḡ_s = Σ_{t∈s} g_t (GFWSVD)
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
    out_grad: str = "token"  # the estimator of G the pass gathers (calibrate.OUT_GRAD_KINDS): token | sequence
    allocator: Optional[str] = None  # the allocation method the CLI pairs with it when --allocate is not given


FACTORIZERS: Registry[Factorizer] = Registry("factorization", __name__)


def register_factorizer(name: str, needs_gradients: bool = False, description: str = "", needs_fisher: bool = False,
                        out_grad: str = "token", allocator: Optional[str] = None):
    """`allocator`: for methods that are a factorization and an allocation together (dobi-svd → dobi), the
    allocation `svdpress compress --factorize NAME` uses when no --allocate is given."""
    def deco(fn):
        FACTORIZERS.register(name)(Factorizer(fn, needs_gradients or needs_fisher, description, needs_fisher,
                                              out_grad, allocator))
        return fn
    return deco


SVD_INPLACE_MIN = 32 * 2**20  # bytes of M from which the SVD is computed over M's own memory (see `thin_svd`)


def thin_svd(M: torch.Tensor, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh = torch.linalg.svd(M, full_matrices=False). LAPACK's gesdd destroys its input, so torch factors a
    copy. When M may be overwritten (a product made for this SVD) and is large, on the CPU in float64, scipy's
    gesdd is handed M's own memory instead: M is row-major, so its memory is Mᵀ in Fortran order, and
    Mᵀ = u s vt gives U = vtᵀ, Vh = uᵀ. That saves one m×n matrix (128 MB for an 8192×2048 layer) at the
    factorization's memory peak, for ~15% more time on such a layer; small layers keep torch's path."""
    if not (overwrite and M.device.type == "cpu" and M.dtype == torch.float64 and M.is_contiguous()
            and M.numel() * 8 >= SVD_INPLACE_MIN):
        return torch.linalg.svd(M, full_matrices=False)
    from scipy.linalg import svd as lapack_svd

    u, s, vt = lapack_svd(M.numpy().T, full_matrices=False, overwrite_a=True, check_finite=False,
                          lapack_driver="gesdd")
    return torch.from_numpy(vt).T, torch.from_numpy(s), torch.from_numpy(u).T


def spectrum_from_svd(M: torch.Tensor, right: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                      left: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, note: str = "",
                      overwrite: bool = False) -> LayerSpectrum:
    """SVD of the (whitened) matrix M = U S Vh; `left`/`right` undo the whitening on U and Vh. With `overwrite`
    (M is a product made for this SVD, or a W handed over) M's memory may be used up by the SVD."""
    U, S, Vh = thin_svd(M, overwrite)
    U = left(U) if left else U
    V = right(Vh) if right else Vh
    return LayerSpectrum(U.float(), S, V.float(), note)
