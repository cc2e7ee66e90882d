"""KFAC-SVD (Thoma et al., ICML 2026): SVD under the Kronecker-factored Fisher of the layer's weights.

K-FAC approximates the Fisher of vec(W) by C ⊗ G, C = Σ_t x_t x_tᵀ (inputs, shared with SVD-LLM) and
G = Σ_t g_t g_tᵀ (gradients of the loss w.r.t. the layer's output, accumulated token by token: summing g over a
sequence first would leave G of rank ≤ #sequences, the rank collapse of earlier Fisher-based SVDs). The loss
increase of a perturbation is then ≈ ½ tr(ΔWᵀ G ΔW C) = ½ ‖L_Gᵀ ΔW L_C‖²_F with G = L_G L_Gᵀ, C = L_C L_Cᵀ, so

    M = L_Gᵀ · W · L_C = U Σ Vᵀ,   W_r = (L_G⁻ᵀ U_r) Σ_r (V_rᵀ L_C⁻¹)

is the optimal rank-r approximation for that Fisher-weighted error, and Σ_{j≥r} σ_j² is exactly that error.

Robust factors: G is damped as in K-FAC, G + δ·mean(diag G)·I (DAMPING = δ, relative so it is scale-free),
which bounds the un-whitening L_G⁻ᵀ in directions the gradients barely visit; both factors then go through
whiten.cholesky (Cholesky, then growing jitter, then a clamped eigen-decomposition). C is not damped beyond that
fallback, so with G = I (any damping) the result equals SVD-LLM's up to a global scale of Σ.
"""

from __future__ import annotations

import torch

from ..calibrate import InputStats
from ..errors import SvdpressError
from . import LayerSpectrum, LayerStats, register_factorizer, spectrum_from_svd
from .whiten import cholesky_inplace, left_mul_, right_mul_, symmetrize_, whitener

DAMPING = 1e-2  # δ in G + δ·mean(diag G)·I


def damped_(G: torch.Tensor, damping: float) -> torch.Tensor:
    """G ← (G + Gᵀ)/2 + δ·mean(diag G)·I, in place (float64)."""
    symmetrize_(G)
    G.diagonal().add_(float(damping * G.diagonal().mean()))
    return G


def kfac_spectrum(W: torch.Tensor, inputs: InputStats, G: torch.Tensor, damping: float = DAMPING,
                  consume: bool = False) -> LayerSpectrum:
    """SVD of L_Gᵀ W L_C, un-whitened on both sides. With `consume`, W and G are this call's own: G's memory
    becomes L_G (an 8192-wide G is 512 MB in float64) and W's becomes L_Gᵀ W L_C; otherwise copies are made."""
    right = whitener(inputs, "cholesky")  # shared by the layers reading this input (q/k/v, gate/up)
    G = G.to(W.device, torch.float64, copy=not consume)
    left = cholesky_inplace(damped_(G, damping))
    if consume:  # L_Gᵀ W L_C written over W
        M = left_mul_(left.S.T.to(W), right_mul_(W, right.S.to(W)))
    else:
        M = left.S.T.to(W) @ W @ right.S.to(W)
    note = "; ".join(f"{side}: {wh.note}" for side, wh in (("out", left), ("in", right)) if wh.note)
    return spectrum_from_svd(M, right=right.undo, left=left.undo_left, note=note, overwrite=True)


@register_factorizer("kfac", needs_gradients=True, description="KFAC-SVD: two-sided (activation x gradient) whitening")
def kfac(W: torch.Tensor, stats: LayerStats) -> LayerSpectrum:
    if stats.out_grad is None:
        raise SvdpressError("kfac needs output-gradient statistics (calibrate.gradient_stats)")
    G = stats.out_grad
    if stats.consume:
        stats.out_grad = None
    return kfac_spectrum(W, stats.inputs, G, DAMPING, stats.consume)
