"""Whitening of input statistics C = X·Xᵀ: C = S·Sᵀ, computed once per shared input and cached on it.

Cholesky first (SVD-LLM). If C is not positive definite (too few tokens, dead channels), retry with a
growing diagonal jitter, and finally fall back to an eigen-decomposition with clamped eigenvalues. What happened
is returned as a note, which ends up in the manifest.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..calibrate import InputStats

JITTERS = (1e-8, 1e-6, 1e-4, 1e-2)  # relative to mean(diag C)
EIG_FLOOR = 1e-8  # eigenvalues clamped to EIG_FLOOR · λ_max


class Whitener:
    """S with C ≈ S·Sᵀ; x ↦ x·S⁻¹ un-whitens a right factor (input side), x ↦ S⁻ᵀ·x a left one (output side)."""

    def __init__(self, S: torch.Tensor, triangular: bool, note: str) -> None:
        self.S, self.triangular, self.note = S, triangular, note

    def undo(self, Vh: torch.Tensor) -> torch.Tensor:
        """Vh·S⁻¹, by a (triangular) solve rather than an explicit inverse: (S⁻ᵀ Vhᵀ)ᵀ."""
        if self.triangular:
            return torch.linalg.solve_triangular(self.S.T, Vh.T, upper=True).T
        return torch.linalg.solve(self.S.T, Vh.T).T

    def undo_left(self, U: torch.Tensor) -> torch.Tensor:
        """S⁻ᵀ·U: the left factor of the SVD of Sᵀ·M back in the original output coordinates."""
        if self.triangular:
            return torch.linalg.solve_triangular(self.S.T, U, upper=True)
        return torch.linalg.solve(self.S.T, U)


def symmetric(C: torch.Tensor) -> torch.Tensor:
    """(C + Cᵀ)/2 with one n×n temporary (n = 8192 is 512 MB in float64)."""
    return torch.add(C, C.T).mul_(0.5)


def cholesky(C: torch.Tensor) -> Whitener:
    """Cholesky whitener of (C + Cᵀ)/2."""
    return cholesky_of(lambda: symmetric(C.double()))


def cholesky_of(make: Callable[[], torch.Tensor]) -> Whitener:
    """Cholesky of the symmetric matrix `make()` builds. The factor is written over that matrix (an 8192-wide
    float64 factor then costs 512 MB, not 1 GB); only when it fails is `make()` called again, for each growing
    diagonal jitter and finally for the eigen fallback."""
    A = make()
    scale = float(A.diagonal().mean().clamp_min(1e-30))
    L, info = _cholesky_inplace(A)
    if info == 0:
        return Whitener(L, True, "")
    del L, A
    for eps in JITTERS:
        A = make()
        A.diagonal().add_(eps * scale)
        L, info = _cholesky_inplace(A)
        if info == 0:
            return Whitener(L, True, f"cholesky jitter {eps:g}*mean(diag)")
        del L, A
    return eigen(make(), note="cholesky failed; eigen fallback", symmetrized=True)


def _cholesky_inplace(A: torch.Tensor) -> tuple[torch.Tensor, int]:
    """L with A = L·Lᵀ, written over A (lower triangle; the upper one is zeroed as torch's own cholesky does)."""
    info = torch.empty((), dtype=torch.int32, device=A.device)
    L, info = torch.linalg.cholesky_ex(A, out=(A, info))
    return L.tril_(), int(info)


def eigen(C: torch.Tensor, note: str = "", symmetrized: bool = False) -> Whitener:
    """C = Q Λ Qᵀ ⇒ S = Q Λ^½ (SVD-LLM v2 style); small eigenvalues are clamped so S stays invertible."""
    C = C.double() if symmetrized else symmetric(C.double())
    lam, Q = torch.linalg.eigh(C)
    floor = EIG_FLOOR * lam.max().clamp_min(1e-30)
    clamped = int((lam < floor).sum())
    S = Q * lam.clamp_min(floor).sqrt()
    extra = f"{clamped} eigenvalues clamped" if clamped else ""
    return Whitener(S, False, "; ".join(x for x in (note, extra) if x))


def whitener(stats: InputStats, kind: str = "cholesky") -> Whitener:
    """The whitener of a shared input, computed once for all layers that read it (q/k/v, gate/up)."""
    if kind not in stats._cache:
        stats._cache[kind] = {"cholesky": cholesky, "eigen": eigen}[kind](stats.xtx)
        if stats._cache.get("release_after_whitening"):
            stats.xtx = None  # the pipeline needs C no further: its memory goes before the SVD's
    return stats._cache[kind]
