"""Whitening of input statistics C = X·Xᵀ: C = S·Sᵀ, computed once per shared input and cached on it.

Cholesky first (SVD-LLM). If C is not positive definite (too few tokens, dead channels), retry with a
growing diagonal jitter, and finally fall back to an eigen-decomposition with clamped eigenvalues. What happened
is returned as a note, which ends up in the manifest.
"""

from __future__ import annotations

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


INPLACE_MIN = 2048  # below this width the Cholesky ladder works on a copy (memory is no concern, MKL is faster)
TILE = 1024  # rows/columns of the tiles that in-place symmetrization and restoring copy through


def symmetric(C: torch.Tensor) -> torch.Tensor:
    """(C + Cᵀ)/2 in a new matrix."""
    return symmetrize_(C.to(torch.float64, copy=True))


def symmetrize_(A: torch.Tensor) -> torch.Tensor:
    """A ← (A + Aᵀ)/2 in place, tile by tile: an 8192-wide float64 matrix (512 MB) needs no second copy."""
    n = A.shape[0]
    for i in range(0, n, TILE):
        for j in range(i, n, TILE):
            a, b = A[i:i + TILE, j:j + TILE], A[j:j + TILE, i:i + TILE]
            s = (a + b.T).mul_(0.5)
            a.copy_(s)
            b.copy_(s.T)
    return A


def right_mul_(W: torch.Tensor, S: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """W ← W·S in place, a slice of rows at a time (the rows of W·S depend only on the same rows of W)."""
    for a in range(0, W.shape[0], rows):
        W[a:a + rows] = W[a:a + rows] @ S
    return W


def left_mul_(T: torch.Tensor, W: torch.Tensor, cols: int = 256) -> torch.Tensor:
    """W ← T·W in place, a slice of columns at a time."""
    for a in range(0, W.shape[1], cols):
        W[:, a:a + cols] = T @ W[:, a:a + cols]
    return W


def cholesky(C: torch.Tensor) -> Whitener:
    """Cholesky whitener of (C + Cᵀ)/2; C is left as it was."""
    return cholesky_inplace(C.to(torch.float64, copy=True))


def cholesky_inplace(A: torch.Tensor) -> Whitener:
    """Cholesky whitener of (A + Aᵀ)/2, computed over A's own memory (float64): the matrix is consumed.

    If A is not positive definite, it is retried with a growing diagonal jitter, and finally replaced by the
    eigen fallback. On the CPU, LAPACK's potrf writes the factor over one triangle and leaves the other as it was
    (scipy's `clean=0`), so each retry restores A from that triangle and an n-vector diagonal: the whole ladder
    costs one n×n matrix, not two or three. Elsewhere (CUDA) torch factors into a new matrix."""
    if A.shape[0] < INPLACE_MIN:  # small: a symmetrized copy is cheap, and torch's (MKL) potrf is faster there
        A = symmetric(A)
    else:
        symmetrize_(A)
    diag = A.diagonal().clone()
    scale = float(diag.mean().clamp_min(1e-30))
    for eps in (0.0,) + JITTERS:
        if eps:
            A.diagonal().copy_(diag).add_(eps * scale)
        L = _potrf(A)
        if L is not None:
            return Whitener(L, True, f"cholesky jitter {eps:g}*mean(diag)" if eps else "")
        _restore(A, diag)
    return eigen(A, note="cholesky failed; eigen fallback", symmetrized=True)


def _inplace(A: torch.Tensor) -> bool:
    return (A.device.type == "cpu" and A.dtype == torch.float64 and A.is_contiguous()
            and A.shape[0] >= INPLACE_MIN)


def _potrf(A: torch.Tensor):
    """L (lower, A = L·Lᵀ), or None if A is not positive definite. On the CPU, L is written over Aᵀ's lower
    triangle (a view of A), and A's strictly lower triangle keeps its values until success."""
    if _inplace(A):
        from scipy.linalg import lapack

        a = A.numpy().T  # Fortran-ordered view of the same memory (A is symmetric: Aᵀ = A)
        _, info = lapack.dpotrf(a, lower=1, clean=0, overwrite_a=1)
        if info != 0:
            return None
        return A.T.tril_()
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        return None
    return L


def _restore(A: torch.Tensor, diag: torch.Tensor) -> None:
    """Undo a failed CPU potrf: Aᵀ's lower triangle (A's upper) from A's intact lower one, then the diagonal."""
    if _inplace(A):
        n = A.shape[0]
        for i in range(0, n, TILE):
            for j in range(i, n, TILE):
                a, b = A[i:i + TILE, j:j + TILE], A[j:j + TILE, i:i + TILE]  # upper tile, its lower mirror
                if i == j:
                    a.copy_(torch.where(torch.ones_like(a, dtype=torch.bool).triu_(1), b.T, a))
                else:
                    a.copy_(b.T)
    A.diagonal().copy_(diag)


def eigen(C: torch.Tensor, note: str = "", symmetrized: bool = False) -> Whitener:
    """C = Q Λ Qᵀ ⇒ S = Q Λ^½ (SVD-LLM v2 style); small eigenvalues are clamped so S stays invertible."""
    C = C.double() if symmetrized else symmetric(C)
    lam, Q = torch.linalg.eigh(C)
    del C
    floor = EIG_FLOOR * lam.max().clamp_min(1e-30)
    clamped = int((lam < floor).sum())
    S = Q.mul_(lam.clamp_min(floor).sqrt())
    extra = f"{clamped} eigenvalues clamped" if clamped else ""
    return Whitener(S, False, "; ".join(x for x in (note, extra) if x))


def whitener(stats: InputStats, kind: str = "cholesky") -> Whitener:
    """The whitener of a shared input, computed once for all layers that read it (q/k/v, gate/up)."""
    if kind not in stats._cache:
        if stats._cache.get("release_after_whitening"):  # the pipeline needs C no further: it is consumed
            C, stats.xtx = stats.xtx, None
            stats._cache[kind] = (cholesky_inplace(C) if kind == "cholesky"
                                  else eigen(symmetrize_(C), symmetrized=True))
        else:
            stats._cache[kind] = {"cholesky": cholesky, "eigen": eigen}[kind](stats.xtx)
    return stats._cache[kind]
