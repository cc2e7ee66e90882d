"""SVD-LLM (Wang et al. 2024): truncation-aware data whitening.

With C = Σ_b X_b X_bᵀ = S·Sᵀ (Cholesky), the SVD of W·S = U Σ Vᵀ truncated at r minimizes ‖(W − W_r) X‖_F on the
calibration inputs, and the truncation error is exactly Σ_{j>r} σ_j². A = U_r Σ_r, B = V_rᵀ S⁻¹.
"""

import torch

from . import LayerSpectrum, LayerStats, register_factorizer, spectrum_from_svd
from .whiten import right_mul_, whitener


@register_factorizer("svd-llm", description="Cholesky-whitened SVD (SVD-LLM)")
def svd_llm(W: torch.Tensor, stats: LayerStats) -> LayerSpectrum:
    wh = whitener(stats.inputs, "cholesky")
    M = right_mul_(W, wh.S.to(W)) if stats.consume else W @ wh.S.to(W)  # W·S (over W when W is ours)
    return spectrum_from_svd(M, right=wh.undo, note=wh.note, overwrite=True)
